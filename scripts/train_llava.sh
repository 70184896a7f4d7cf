#!/usr/bin/env bash
# LLaVA-1.5 on a stage-2 vision tower: pretrain (projector) -> finetune (instructions) -> export -> eval
# (lmms-eval on the world's held-out QA suite). Sets up .venv first when it is missing.
#
# Environment (defaults: the tiny embedded run):
#   VISION_TOWER  stage-2 tower directory        runs/stage2/llm2clip/vision_tower
#   LLM           causal LM directory             runs/tiny-llm
#   DATA          synthetic world directory       runs/world
#                 (or any folder in its layout: llava/{pretrain,finetune}.json, llava/qa_test.jsonl, images/)
#   OUT           output directory                runs/llava
#   NPROC         torchrun processes per trainer  1
#   SEED          training seed of both trainers  (the configs': 42)
#   PRETRAIN_CONFIG  YAML for mllm pretrain        configs/tiny-llava-pretrain.yaml
#   FINETUNE_CONFIG  YAML for mllm finetune        configs/tiny-llava-finetune.yaml
#   EVAL_CONFIG      optional YAML for mllm eval   (real scale: configs/llava-1.5-7b-*.yaml for the first two)
# A rerun resumes: finished trainers are skipped, others continue from their newest checkpoint; export and
# eval redo (quick).
# Compare towers: run once per tower with its own OUT, then `mllm eval --config configs/tiny-llava-eval.yaml`;
# over several seeds: scripts/compare_llava_towers.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VISION_TOWER="${VISION_TOWER:-runs/stage2/llm2clip/vision_tower}"
LLM="${LLM:-runs/tiny-llm}"
DATA="${DATA:-runs/world}"
OUT="${OUT:-runs/llava}"
NPROC="${NPROC:-1}"

if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "train_llava: NPROC must be a positive integer, got '$NPROC'" >&2
  exit 1
fi
mllm=("$venv/bin/python" -m mllm.cli)
trainer=("${mllm[@]}")
if [ "$NPROC" -gt 1 ]; then
  trainer=("$venv/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m mllm.cli)
fi

pretrain_config=(--config "${PRETRAIN_CONFIG:-configs/tiny-llava-pretrain.yaml}")
finetune_config=(--config "${FINETUNE_CONFIG:-configs/tiny-llava-finetune.yaml}")
eval_config=()
if [ -n "${EVAL_CONFIG:-}" ]; then eval_config=(--config "$EVAL_CONFIG"); fi
seed=()
if [ -n "${SEED:-}" ]; then seed=("train.seed=$SEED"); fi

step "pretrain (projector on captions)" "${trainer[@]}" pretrain "${pretrain_config[@]}" \
  --vision-tower "$VISION_TOWER" --llm "$LLM" --data "$DATA/llava/pretrain.json" --image-folder "$DATA" \
  --out "$OUT/pretrain" "${seed[@]}"
step "finetune (instructions)" "${trainer[@]}" finetune "${finetune_config[@]}" \
  --model "$OUT/pretrain/final" --data "$DATA/llava/finetune.json" --image-folder "$DATA" \
  --out "$OUT/finetune" "${seed[@]}"
step "export (plain HF Llava)" "${mllm[@]}" export \
  --model "$OUT/finetune/final" --out "$OUT/export" image="$DATA/images/val/val-00000.png"
step "eval (lmms-eval, synth_qa)" "${mllm[@]}" eval "${eval_config[@]}" \
  --models "$OUT/export" --names "$(basename "$OUT")" --world "$DATA" --out "$OUT/eval"
echo
echo "train_llava: done: model in $OUT/export, report in $OUT/eval/report.md"
