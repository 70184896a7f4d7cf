#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Safe to run repeatedly:
# it reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLM2CLIP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.llm2clip-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import llm2clip, torch" 2>/dev/null; then
  exit 0
fi
echo "[setup] building the environment in $venv (about 5 minutes on a fresh machine)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# These two builds come from local wheel files; any other torch pulls gigabytes.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
DS_BUILD_OPS=0 "${pip[@]}" -e "$root[all]" torch==2.14.1 torchvision==0.29.1
echo "$want" >"$stamp"
echo "[setup] ready: $venv" >&2
