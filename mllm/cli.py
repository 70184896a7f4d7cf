"""The `mllm` console script: LLaVA-1.5 on an LLM2CLIP vision tower.

It shares the `llm2clip` command machinery: every subcommand reads a config dataclass whose defaults
are the tiny embedded run, a YAML file (`--config`) and `KEY=VALUE` overrides change any key, and
named flags are shortcuts for common keys.

Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the environment says otherwise: with libgomp's
default they spin, and on CPU cores shared with other processes a tiny LLaVA's finetune step then took 1.8x
as long (bench/llava_step.py). The policy is read once, when torch loads OpenMP, so it is set before any import
of torch.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llm2clip import cli  # noqa: E402 (after the OpenMP policy)
from llm2clip.cli import Command, Flag  # noqa: E402

COMMANDS: tuple[Command, ...] = (
    Command(
        ("pretrain",),
        "mllm.train:PretrainConfig",
        "mllm.train:pretrain",
        "Build a Llava from a vision tower and an LLM, and train its projector on caption data (plain template).",
        flags=(
            Flag("--vision-tower", "model.vision_tower", "CLIPVisionModel directory (e.g. stage 2's vision_tower/)"),
            Flag("--llm", "model.llm", "causal LM directory"),
            Flag("--data", "data.path", "LLaVA pretraining JSON (blip_laion_cc_sbu_558k.json form)"),
            Flag("--image-folder", "data.image_folder", "folder the JSON's image paths are relative to"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--deepspeed", "train.deepspeed", "DeepSpeed JSON config"),
        ),
        dry_run="mllm.dryrun_plans:plan_pretrain",
    ),
    Command(
        ("finetune",),
        "mllm.train:FinetuneConfig",
        "mllm.train:finetune",
        "Instruction-tune a Llava (projector and LLM, full or LoRA) on LLaVA conversation data.",
        flags=(
            Flag("--model", "model", "Llava directory (pretrain's final/)"),
            Flag("--data", "data.path", "LLaVA instruction JSON (llava_v1_5_mix665k.json form)"),
            Flag("--image-folder", "data.image_folder", "folder the JSON's image paths are relative to"),
            Flag("--template", "data.template", "plain | vicuna_v1 | llm"),
            Flag("--tune", "tune", "full | lora"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--deepspeed", "train.deepspeed", "DeepSpeed JSON config"),
        ),
        dry_run="mllm.dryrun_plans:plan_finetune",
    ),
    Command(
        ("export",),
        "mllm.export:ExportConfig",
        "mllm.export:export",
        "Write a plain HF Llava directory (LoRA merged), reload it and answer a question about an image.",
        flags=(
            Flag("--model", "model", "Llava or LoRA adapter directory (finetune's final/ or a checkpoint)"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--dtype", "dtype", "auto | float32 | bfloat16 | float16"),
        ),
    ),
    Command(
        ("probe",),
        "mllm.probe:ProbeConfig",
        "mllm.probe:probe",
        "Fit linear probes from a vision tower's LLaVA features to the world's scene attributes, beside the floor.",
        flags=(
            Flag("--tower", "tower", "CLIPVisionModel directory (e.g. stage 2's vision_tower/)"),
            Flag("--world", "world", "synthetic world directory (<split>.jsonl records and images)"),
            Flag("--out", "out_dir", "directory for probe.json and probe.md"),
        ),
    ),
    Command(
        ("oracle",),
        "mllm.oracle:OracleConfig",
        "mllm.oracle:build_oracle",
        "Diagnostic: a world of images that encode each scene exactly and a tower that passes the code to the projector.",
        flags=(
            Flag("--world", "world", "synthetic world directory"),
            Flag("--out", "out_dir", "output directory (tower/ and world/)"),
        ),
    ),
    Command(
        ("eval",),
        "mllm.evaluate:EvalConfig",
        "mllm.evaluate:evaluate",
        "Benchmark exported Llava directories with lmms-eval (llava_hf) and write a side-by-side report.",
        flags=(
            Flag("--models", "models", "exported Llava directories, comma-separated"),
            Flag("--names", "names", "display names, comma-separated, one per model"),
            Flag("--tasks", "tasks", "synth_qa, synth_qa_<type> or lmms-eval task names, comma-separated"),
            Flag("--world", "world", "synthetic world directory (for the synth_qa tasks)"),
            Flag("--split", "split", "world split of the synth_qa questions: val | test"),
            Flag("--limit", "limit", "first N samples of each task"),
            Flag("--device", "device", "cpu | cuda | cuda:N"),
            Flag("--out", "out_dir", "directory for lmms-eval's outputs, report.json and report.md"),
        ),
    ),
    Command(
        ("compare",),
        "mllm.compare:CompareConfig",
        "mllm.compare:compare",
        "Table `mllm eval` reports of several seeds per model: mean ± std and range per task, beside the floor.",
        flags=(
            Flag("--reports", "reports", "report.json files of `mllm eval`, comma-separated, one run each"),
            Flag("--groups", "groups", "the model each report belongs to, comma-separated, one per report"),
            Flag("--out", "out_dir", "directory for compare.json and compare.md"),
        ),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, commands=COMMANDS, prog="mllm", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
