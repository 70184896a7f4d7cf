#!/usr/bin/env bash
# Run the test suite (sets up .venv first when it is missing). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${LLM2CLIP_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
