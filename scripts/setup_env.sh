#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the committed lock,
# requirements.lock, so a fresh machine gets exactly the set the suite was run on. Safe to run
# repeatedly: it reinstalls only when pyproject.toml or the lock changed since the last successful
# install. `bash scripts/lock_env.sh` refreshes the lock from pyproject.toml's ranges.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLM2CLIP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
lock="$root/requirements.lock"
stamp="$venv/.llm2clip-installed"
want="$(cat "$root/pyproject.toml" "$lock" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import llm2clip, torch" 2>/dev/null; then
  exit 0
fi
echo "[setup] building the environment in $venv from requirements.lock (about 5 minutes on a fresh machine)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# These two builds come from local wheel files; any other torch pulls gigabytes.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
DS_BUILD_OPS=0 "${pip[@]}" -r "$lock"
"${pip[@]}" --no-deps -e "$root"
echo "$want" >"$stamp"
echo "[setup] ready: $venv" >&2
