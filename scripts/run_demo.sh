#!/usr/bin/env bash
# The whole LLM2CLIP story in one command: `llm2clip demo` (configs/demo.yaml) runs every step of run_stage1.sh,
# run_stage2.sh and train_llava.sh (once per tower) plus `mllm eval`, then writes OUT/report.md with its figures.
# Sets up .venv first when it is missing. Arguments go to `llm2clip demo`: --profile quick (minutes) or full (the
# default), --out DIR (default runs/demo), --force STEP, --config FILE, KEY=VALUE. A rerun reuses finished steps.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec "$venv/bin/python" -m llm2clip.cli demo "$@"
