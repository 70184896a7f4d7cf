"""The `llm2clip` console script.

Every subcommand reads a config dataclass whose defaults are the tiny embedded run. A YAML file
(`--config`) and `KEY=VALUE` overrides change any key; named flags are shortcuts for common keys.
Command modules are imported only when their command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from dataclasses import dataclass, field

from llm2clip.config import ConfigError, config_keys, dump_config, load_config
from llm2clip.errors import InputError
from llm2clip.logs import setup_logging

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


@dataclass(frozen=True)
class Flag:
    name: str  # e.g. "--model"
    key: str  # dotted config key it sets
    help: str


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("stage1", "mntp")
    config: str  # "module:ConfigClass"
    target: str  # "module:function" taking the config
    help: str
    flags: tuple[Flag, ...] = ()
    positional: Flag | None = None  # a positional argument that sets a key
    extra: dict[str, str] = field(default_factory=dict)
    dry_run: str | None = None  # "module:function" taking the config and returning a `llm2clip.dryrun.Plan`
    default_config: str | None = None  # "module:NAME" of the YAML file read when --config is not given


COMMANDS: tuple[Command, ...] = (
    Command(
        ("synth",),
        "llm2clip.data.synth:SynthConfig",
        "llm2clip.data.synth:generate_world",
        "Generate the seeded synthetic world: images, captions, a corpus and LLaVA data.",
        flags=(
            Flag("--out", "out_dir", "output directory"),
            Flag("--seed", "seed", "random seed"),
        ),
    ),
    Command(
        ("tiny-llm",),
        "llm2clip.text.tiny_llm:TinyLLMConfig",
        "llm2clip.text.tiny_llm:build_tiny_llm",
        "Train a BPE tokenizer and pretrain a tiny Llama on the world's corpus.",
        flags=(
            Flag("--corpus", "corpus", "plain-text corpus, one sentence per line"),
            Flag("--out", "out_dir", "output directory"),
        ),
    ),
    Command(
        ("encode",),
        "llm2clip.text.encode_cli:EncodeConfig",
        "llm2clip.text.encode_cli:encode_file",
        "Encode one text per line into a float32 [N, D] .npy array.",
        flags=(
            Flag("--model", "model", "encoder directory (HF or llm2vec layout)"),
            Flag("--pooling", "pooling_mode", "mean | weighted_mean | eos_token | last_token | bos_token"),
            Flag("--out", "out", "output .npy file"),
            Flag("--instruction", "instruction", "instruction prepended to every text"),
            Flag("--batch-size", "batch_size", "texts per forward pass"),
        ),
        positional=Flag("texts", "texts", "text file, one text per line"),
    ),
    Command(
        ("stage1", "mntp"),
        "llm2clip.text.mntp:MNTPConfig",
        "llm2clip.text.mntp:train_mntp",
        "Masked next-token prediction with LoRA on a bidirectional decoder.",
        flags=(
            Flag("--model", "model", "base causal LM directory"),
            Flag("--corpus", "corpus", "plain-text corpus"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--deepspeed", "train.deepspeed", "DeepSpeed JSON config"),
        ),
        dry_run="llm2clip.dryrun_plans:plan_mntp",
    ),
    Command(
        ("stage1", "contrastive"),
        "llm2clip.text.contrastive:ContrastiveConfig",
        "llm2clip.text.contrastive:train_contrastive",
        "Caption-contrastive (supervised SimCSE) LoRA training on top of the MNTP model.",
        flags=(
            Flag("--model", "model", "MNTP output directory (or any encoder directory)"),
            Flag("--data", "data", "dataset directory or JSONL file with several captions per image"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--deepspeed", "train.deepspeed", "DeepSpeed JSON config"),
        ),
        dry_run="llm2clip.dryrun_plans:plan_contrastive",
    ),
    Command(
        ("cra",),
        "llm2clip.text.cra:CRAConfig",
        "llm2clip.text.cra:report_cra",
        "Caption retrieval accuracy of an encoder (and of a bag-of-words baseline).",
        flags=(
            Flag("--model", "model", "encoder directory"),
            Flag("--data", "data", "dataset directory or JSONL file"),
            Flag("--split", "split", "split name when --data is a world directory"),
            Flag("--out", "out", "optional JSON report path"),
        ),
    ),
    Command(
        ("eval",),
        "llm2clip.eval.run:EvalConfig",
        "llm2clip.eval.run:evaluate",
        "Retrieval (short, long, translated captions), zero-shot and CRA of LLM2CLIP and CLIP models side by side.",
        flags=(
            Flag("--models", "models", "checkpoint directories, comma-separated (LLM2CLIP or CLIP)"),
            Flag("--names", "names", "display names, comma-separated, one per model"),
            Flag("--text-encoder", "text_encoder", "LLM caption encoder of the LLM2CLIP models"),
            Flag("--data", "data", "world directory, JSONL, COCO-Karpathy or ShareGPT4V JSON"),
            Flag("--split", "split", "split to evaluate"),
            Flag("--tasks", "tasks", "comma-separated tasks"),
            Flag("--out", "out_dir", "directory for report.json and report.md"),
        ),
    ),
    Command(
        ("embed",),
        "llm2clip.embed.build:EmbedConfig",
        "llm2clip.embed.build:build_cache",
        "Cache the frozen encoder's caption embeddings for stage 2 (sharded, resumable, torchrun-aware).",
        flags=(
            Flag("--model", "model", "caption encoder directory (the stage-1 merged model)"),
            Flag("--data", "data", "dataset directory, .jsonl or .json file"),
            Flag("--out", "out_dir", "cache directory"),
            Flag("--split", "split", "split name when --data has splits"),
        ),
        dry_run="llm2clip.dryrun_plans:plan_embed",
    ),
    Command(
        ("stage2",),
        "llm2clip.stage2.train:Stage2Config",
        "llm2clip.stage2.train:train_stage2",
        "Train a CLIP vision tower against cached LLM caption embeddings (or the plain CLIP baseline).",
        flags=(
            Flag("--model-type", "model_type", "llm2clip | clip (the baseline with its own text transformer)"),
            Flag("--data", "data", "world directory, .jsonl, COCO-Karpathy or ShareGPT4V .json"),
            Flag("--shards", "shards", "tar shards: directories, globs or {000..099} ranges, comma-separated"),
            Flag("--cache", "cache", "caption-embedding cache of the data (llm2clip)"),
            Flag("--encoder", "encoder", "caption encoder the cache must come from"),
            Flag("--out", "out_dir", "output directory"),
            Flag("--deepspeed", "train.deepspeed", "DeepSpeed JSON config"),
        ),
        dry_run="llm2clip.dryrun_plans:plan_stage2",
    ),
    Command(
        ("convert",),
        "llm2clip.interop.convert:ConvertConfig",
        "llm2clip.interop.convert:convert",
        "Convert an official LLM2CLIP release into this package's layout, without remote code.",
        flags=(
            Flag("--source", "source",
                 "hf_release: a microsoft/LLM2CLIP-Openai-L-14-336 or -B-16 directory (CLIPConfig; vision_model, "
                 "visual_projection, text_adapter, logit_scale in model.safetensors) -> an LLM2CLIP checkpoint. "
                 "eva_checkpoint: a .pt/.bin/.safetensors file of LLM2CLIP's GitHub training (visual.* OpenAI ViT, "
                 "text.text_adaptor.{0..5}, logit_scale) -> an LLM2CLIP checkpoint; EVA02 towers are refused. "
                 "llm2vec_encoder: a microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned directory -> an encoder "
                 "directory (mean pooling, max length 512, Llama-3-Instruct template)"),
            Flag("--checkpoint", "checkpoint", "the release's directory (or file, for eva_checkpoint)"),
            Flag("--encoder", "encoder", "caption encoder the adapter was trained on (its width is checked)"),
            Flag("--out", "out_dir", "output directory"),
        ),
    ),
    Command(
        ("export",),
        "llm2clip.interop.export:ExportConfig",
        "llm2clip.interop.export:export",
        "Export an LLM2CLIP checkpoint's image tower for transformers/LLaVA or open_clip.",
        flags=(
            Flag("--model", "model", "LLM2CLIP checkpoint directory (stage 2's final/ or a converted release)"),
            Flag("--format", "format",
                 "clip_vision: a plain CLIPVisionModel directory (LLaVA-1.5's mm_vision_tower, mllm). "
                 "open_clip: open_clip_config.json + weights for open_clip's 'local-dir:' loader"),
            Flag("--out", "out_dir", "output directory"),
        ),
    ),
    Command(
        ("demo",),
        "llm2clip.demo.config:DemoConfig",
        "llm2clip.demo.runner:run_demo",
        "Run the whole LLM2CLIP story (world, stage 1, CRA, stage 2, eval, LLaVA on both towers) and write a report.",
        flags=(
            Flag("--profile", "profile", "a profile of the config: full (the default budgets) | quick (minutes)"),
            Flag("--out", "out_dir", "output directory (every step's outputs, logs/, report.md, figures/)"),
            Flag("--force", "force", "redo this step and every step after it"),
        ),
        default_config="llm2clip.demo.config:DEFAULT_CONFIG",
    ),
)


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _build_parser(commands: tuple[Command, ...], prog: str, description: str
                  ) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], tuple[Command, argparse.ArgumentParser]]]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    nested: dict[str, argparse._SubParsersAction] = {}
    table: dict[tuple[str, ...], tuple[Command, argparse.ArgumentParser]] = {}
    for command in commands:
        target = groups
        if len(command.words) == 2:
            group = command.words[0]
            if group not in nested:
                sub = groups.add_parser(group, help=f"{group} commands")
                nested[group] = sub.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = nested[group]
        p = target.add_parser(
            command.words[-1],
            help=command.help,
            description=command.help,
            epilog="Any config key can be set as KEY=VALUE (dotted for sections, e.g. train.max_steps=50). "
            "Use --print-config to see every key and its value.",
        )
        default = f"configs/{command.words[-1]}.yaml" if command.default_config else "the tiny embedded run"
        p.add_argument("--config", help=f"YAML config file (default: {default})")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if command.dry_run is not None:
            p.add_argument("--dry-run", action="store_true", help="build the real-size model on the meta device from "
                           "config.json files only; print parameters, shapes and memory per GPU under ZeRO-2/3; exit")
            p.add_argument("--gpus", type=int, default=8, help="GPUs of one node for the dry run's memory (default 8)")
        for flag in command.flags:
            p.add_argument(flag.name, dest="flag:" + flag.key, metavar=flag.key.split(".")[-1].upper(), help=flag.help)
        p.add_argument("args", nargs="*", metavar="KEY=VALUE" if command.positional is None else f"{command.positional.name.upper()} | KEY=VALUE",
                       help=command.positional.help if command.positional else "config overrides")
        p.set_defaults(_command=command.words)
        table[command.words] = (command, p)
    return parser, table


def _parse(parser: argparse.ArgumentParser, table: dict, argv: list[str] | None
           ) -> tuple[argparse.Namespace, Command, list[str]]:
    """Flags, overrides and the positional in any order (`parse_intermixed_args` refuses subcommands).

    argparse gives the `KEY=VALUE` positional only the first run of bare words; later runs come back
    as unknown arguments and are appended in order, so a later override still wins.
    """
    args, rest = parser.parse_known_args(argv)
    command, sub = table[args._command]
    stray = [item for item in rest if item.startswith("-")]
    if stray:
        sub.error(f"unrecognized arguments: {' '.join(stray)}")
    return args, command, [*args.args, *rest]


def main(argv: list[str] | None = None, commands: tuple[Command, ...] = COMMANDS, prog: str = "llm2clip",
         description: str = __doc__.splitlines()[0]) -> int:
    """Run one command of `commands` (another console script, such as `mllm`, passes its own table)."""
    parser, table = _build_parser(commands, prog, description)
    args, command, items = _parse(parser, table, argv)
    overrides, positionals = [], []
    for item in items:
        (overrides if _OVERRIDE.match(item) else positionals).append(item)
    if positionals:
        if command.positional is None or len(positionals) > 1:
            parser.error(f"unexpected argument(s): {' '.join(positionals)} (overrides are KEY=VALUE)")
        overrides.append(f"{command.positional.key}={positionals[0]}")
    for name, value in vars(args).items():
        if name.startswith("flag:") and value is not None:
            overrides.append(f"{name[5:]}={value}")
    config_cls = _resolve(command.config)
    config_file = args.config or (_resolve(command.default_config) if command.default_config else None)
    try:
        config = load_config(config_cls, config_file, overrides)
    except ConfigError as err:
        print(f"{prog} {' '.join(command.words)}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    setup_logging()
    try:
        if getattr(args, "dry_run", False):
            from llm2clip.dryrun import report

            report(_resolve(command.dry_run)(config), gpus=args.gpus)
        else:
            _resolve(command.target)(config)
    except (ConfigError, InputError, FileNotFoundError) as err:
        print(f"{prog} {' '.join(command.words)}: error: {err}", file=sys.stderr)
        return 1
    return 0


def valid_keys(words: tuple[str, ...]) -> list[str]:
    """Config keys of a command (for docs and tests)."""
    command = {c.words: c for c in COMMANDS}[words]
    return config_keys(_resolve(command.config))


if __name__ == "__main__":
    sys.exit(main())
