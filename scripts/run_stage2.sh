#!/usr/bin/env bash
# Stage 2 on the embedded default (after scripts/run_stage1.sh): cache the frozen stage-1 encoder's
# caption embeddings, train LLM2CLIP and the plain-CLIP baseline on the same ViT, data and budget,
# then evaluate both side by side. RUNS (default: runs) as in run_stage1.sh; reruns resume.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
llm2clip="$venv/bin/llm2clip"
runs="${RUNS:-runs}"
encoder="$runs/stage1/contrastive/merged"

[ -f "$encoder/config.json" ] || { echo "run_stage2: no stage-1 encoder at $encoder; run scripts/run_stage1.sh first" >&2; exit 1; }
step "caption-embedding cache (English short + long captions)" "$llm2clip" embed \
  --model "$encoder" --data "$runs/world" --split train --out "$runs/cache/train" kinds=short,long
step "stage 2: LLM2CLIP" "$llm2clip" stage2 --config configs/tiny-stage2.yaml \
  --data "$runs/world" --cache "$runs/cache/train" --encoder "$encoder" --out "$runs/stage2/llm2clip"
step "stage 2: plain-CLIP baseline" "$llm2clip" stage2 --config configs/tiny-stage2-baseline.yaml \
  --data "$runs/world" --out "$runs/stage2/clip"
step "evaluation" "$llm2clip" eval --data "$runs/world" --split test \
  --models "$runs/stage2/llm2clip/final,$runs/stage2/clip/final" --names LLM2CLIP,CLIP --out "$runs/eval"
echo
echo "stage 2 done: towers in $runs/stage2/*/vision_tower, report in $runs/eval/report.md"
