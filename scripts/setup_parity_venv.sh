#!/usr/bin/env bash
# Create .venv-llm2vec, the reference environment for the llm2vec parity test and bench, from its
# committed lock, tests/parity/requirements.lock (llm2vec 0.2.3, transformers 4.44.2, torch 2.13.0).
# llm2vec needs transformers<=4.44.2, so it never shares the project's venv. Built only when missing or
# when the lock changes (a stamp records a successful install); prints its python.
# `bash scripts/lock_env.sh` refreshes the lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLM2VEC_VENV:-$root/.venv-llm2vec}"
python="${PYTHON:-python3}"
lock="$root/tests/parity/requirements.lock"
stamp="$venv/.llm2vec-installed"
want="$(sha256sum "$lock" | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import llm2vec" 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
echo "[parity] building $venv from tests/parity/requirements.lock (about 2-3 minutes)" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
# torch 2.13.0 comes from a local CPU wheel; any other torch pulls gigabytes.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$lock" >&2
"$venv/bin/python" -c "import llm2vec, peft, transformers; assert transformers.__version__ == '4.44.2'"
echo "$want" >"$stamp"
echo "[parity] ready: $venv" >&2
echo "$venv/bin/python"
