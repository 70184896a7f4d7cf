#!/usr/bin/env bash
# Create .venv-llm2vec, the reference environment for the llm2vec parity test and bench.
# llm2vec 0.2.3 needs transformers<=4.44.2, so it never shares the project's venv. Built only when
# missing or when the pins below change (a stamp records a successful install); prints its python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLM2VEC_VENV:-$root/.venv-llm2vec}"
python="${PYTHON:-python3}"
# torch 2.13.0 comes from a local CPU wheel; any other torch pulls gigabytes.
pins=(torch==2.13.0 llm2vec==0.2.3 transformers==4.44.2 peft==0.17.1)
stamp="$venv/.llm2vec-installed"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ] && "$venv/bin/python" -c "import llm2vec" 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
echo "[parity] building $venv (about 2-3 minutes)" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[0]}" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
"$venv/bin/python" -c "import llm2vec, peft, transformers; assert transformers.__version__ == '4.44.2'"
echo "${pins[*]}" >"$stamp"
echo "[parity] ready: $venv" >&2
echo "$venv/bin/python"
