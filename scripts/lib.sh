# Sourced by the run scripts: sets up .venv when it is missing, moves to the repository root, and
# defines `step NAME COMMAND...`, which runs one named step and stops the script when it fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
venv="${LLM2CLIP_VENV:-$root/.venv}"
script_name="$(basename "$0" .sh)"

step() {
  local name="$1"
  shift
  echo
  echo "== $name"
  "$@" || { echo "$script_name: step '$name' failed (exit $?); fix it and rerun to resume: $*" >&2; exit 1; }
}
