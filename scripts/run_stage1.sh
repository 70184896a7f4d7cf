#!/usr/bin/env bash
# Stage 1 on the embedded default: synthetic world -> tiny LLM -> MNTP -> caption contrastive,
# with caption retrieval accuracy (CRA) before and after. Sets up .venv first when it is missing.
# RUNS (default: runs) is where everything is written; a rerun resumes or skips finished steps.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
llm2clip="$venv/bin/llm2clip"
runs="${RUNS:-runs}"

step "synthetic world" "$llm2clip" synth --out "$runs/world"
step "tiny LLM" "$llm2clip" tiny-llm --corpus "$runs/world/corpus.txt" --out "$runs/tiny-llm"
step "stage 1a: MNTP" "$llm2clip" stage1 mntp --config configs/tiny-stage1-mntp.yaml \
  --model "$runs/tiny-llm" --corpus "$runs/world/corpus.txt" --out "$runs/stage1/mntp"
step "stage 1b: caption contrastive" "$llm2clip" stage1 contrastive --config configs/tiny-stage1-contrastive.yaml \
  --model "$runs/stage1/mntp/merged" --data "$runs/world" --out "$runs/stage1/contrastive" \
  corpus="$runs/world/corpus.txt"
step "CRA on short, long and translated captions before and after stage 1" "$llm2clip" cra --data "$runs/world" \
  --split test kind=short,long,translated,translated_long \
  --model "$runs/tiny-llm,$runs/stage1/mntp/merged,$runs/stage1/contrastive/merged" --out "$runs/stage1/cra-{kind}.json"
echo
echo "stage 1 done: encoder in $runs/stage1/contrastive/merged, CRA reports in $runs/stage1/cra-{short,long,translated,translated_long}.json"
