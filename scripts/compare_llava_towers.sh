#!/usr/bin/env bash
# LLaVA on the LLM2CLIP tower against LLaVA on the plain-CLIP tower of stage 2, at several seeds: the same
# LLM, data and budget (scripts/train_llava.sh with the tiny-llava configs), then `mllm compare` tables each
# synth_qa category as mean ± std and range over the seeds beside the no-image majority-answer floor.
# About 3 minutes per run on 2 idle cores, so 18 minutes at the defaults. A rerun skips finished trainers.
#
# Environment (defaults: the tiny embedded run):
#   RUNS     root of the stage-2 towers and of the outputs  runs
#   TOWERS   name=tower-directory pairs                      llm2clip=$RUNS/stage2/llm2clip/vision_tower
#                                                            clip=$RUNS/stage2/clip/vision_tower
#   SEEDS    training seeds                                  1 2 3
#   OUT      output directory                                $RUNS/llava-compare
#   LLM, DATA, NPROC and the *_CONFIG variables go to scripts/train_llava.sh as they are.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs="${RUNS:-runs}"
towers="${TOWERS:-llm2clip=$runs/stage2/llm2clip/vision_tower clip=$runs/stage2/clip/vision_tower}"
seeds="${SEEDS:-1 2 3}"
out="${OUT:-$runs/llava-compare}"
export LLM="${LLM:-$runs/tiny-llm}" DATA="${DATA:-$runs/world}"

reports=()
groups=()
for seed in $seeds; do
  for pair in $towers; do
    name="${pair%%=*}"
    tower="${pair#*=}"
    if [ "$name" = "$pair" ] || [ -z "$name" ]; then
      echo "compare_llava_towers: TOWERS takes name=directory pairs, got '$pair'" >&2
      exit 1
    fi
    step "LLaVA on $name, seed $seed" env SEED="$seed" VISION_TOWER="$tower" OUT="$out/$name-seed$seed" \
      bash scripts/train_llava.sh
    reports+=("$out/$name-seed$seed/eval/report.json")
    groups+=("$name")
  done
done
joined() { local IFS=,; echo "$*"; }
step "compare" "$venv/bin/python" -m mllm.cli compare --reports "$(joined "${reports[@]}")" \
  --groups "$(joined "${groups[@]}")" --out "$out"
