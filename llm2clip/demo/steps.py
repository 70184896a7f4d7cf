"""The demo's steps: each one the command lines a user would type (scripts/run_stage1.sh, run_stage2.sh and
train_llava.sh once per tower, then `mllm eval`), with each command's config file and the profile's overrides.

Outputs go under the demo's out_dir in the scripts' layout (world/, tiny-llm/, stage1/, cache/, stage2/, eval/,
llava/). A step whose input is given by path (`world:`, `llm:`) is kept in the table, marked as given.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llm2clip.demo.config import DemoConfig

CRA_KINDS = ("short", "long", "translated", "translated_long")
TOWERS = ("llm2clip", "clip")  # stage 2's two towers, in the order every table shows them
EVAL_NAMES = {"llm2clip": "LLM2CLIP", "clip": "CLIP"}  # `llm2clip eval --names`


@dataclass
class Call:
    name: str  # command name: the key of its config file and profile overrides
    module: str  # "llm2clip.cli" or "mllm.cli"
    args: list[str]
    config: str | None = None
    overrides: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        config = ["--config", self.config] if self.config else []
        return [sys.executable, "-m", self.module, *self.args, *config, *self.overrides]


@dataclass
class Step:
    key: str  # what --force takes and demo_state.json records
    title: str  # the console's and report's name
    calls: list[Call]
    outputs: list[Path]  # removed before the step is redone
    given: Path | None = None  # an input given by path: nothing to run

    def fingerprint(self) -> str:
        """Hash of the step's command lines (less the interpreter) and the contents of their config files."""
        configs = {c.config: _file_hash(c.config) for c in self.calls if c.config}
        blob = json.dumps({"calls": [c.argv()[1:] for c in self.calls], "configs": configs,
                           "given": str(self.given) if self.given else None}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Paths:
    """Where every step writes (and reads) under out_dir."""

    def __init__(self, config: DemoConfig):
        out = Path(config.out_dir)
        self.out = out
        self.world = Path(config.world) if config.world else out / "world"
        self.llm = Path(config.llm) if config.llm else out / "tiny-llm"
        self.mntp = out / "stage1" / "mntp"
        self.contrastive = out / "stage1" / "contrastive"
        self.encoder = self.contrastive / "merged"
        self.cache = out / "cache" / "train"
        self.eval = out / "eval"
        self.llava_eval = out / "llava" / "eval"
        self.logs = out / "logs"
        self.figures = out / "figures"

    def cra(self, kind: str) -> Path:
        return self.out / "stage1" / f"cra-{kind}.json"

    def stage2(self, tower: str) -> Path:
        return self.out / "stage2" / tower

    def llava(self, tower: str) -> Path:
        return self.out / "llava" / tower

    def cra_models(self) -> list[Path]:
        """The encoders CRA compares, before and after stage 1."""
        return [self.llm, self.mntp / "merged", self.encoder]


def build_steps(config: DemoConfig, overrides: dict[str, list[str]]) -> list[Step]:
    paths = Paths(config)
    world, corpus = paths.world, paths.world / "corpus.txt"

    def call(name: str, module: str, *args: object) -> Call:
        return Call(name, module, [str(a) for a in args], config.configs.get(name), list(overrides.get(name, [])))

    def llm2clip(name: str, *args: object) -> Call:
        return call(name, "llm2clip.cli", *args)

    def mllm(name: str, *args: object) -> Call:
        return call(name, "mllm.cli", *args)

    steps = [
        Step("world", "synthetic world", [llm2clip("synth", "synth", "--out", paths.world)], [paths.world],
             given=paths.world if config.world else None),
        Step("tiny-llm", "tiny LLM", [llm2clip("tiny_llm", "tiny-llm", "--corpus", corpus, "--out", paths.llm)],
             [paths.llm], given=paths.llm if config.llm else None),
        Step("mntp", "stage 1a: MNTP", [llm2clip("mntp", "stage1", "mntp", "--model", paths.llm, "--corpus", corpus,
                                                 "--out", paths.mntp)], [paths.mntp]),
        Step("contrastive", "stage 1b: caption contrastive",
             [llm2clip("contrastive", "stage1", "contrastive", "--model", paths.mntp / "merged", "--data", world,
                       "--out", paths.contrastive, f"corpus={corpus}")], [paths.contrastive]),
        Step("cra", "CRA before/after stage 1 (short, long, EN->FR)",
             [llm2clip("cra", "cra", "--data", world, "--split", "test", f"kind={','.join(CRA_KINDS)}",
                       "--model", ",".join(map(str, paths.cra_models())), "--out", paths.cra("{kind}"))],
             [paths.cra(kind) for kind in CRA_KINDS]),
        Step("embed", "caption-embedding cache",
             [llm2clip("embed", "embed", "--model", paths.encoder, "--data", world, "--split", "train",
                       "--out", paths.cache, "kinds=short,long")], [paths.cache]),
        Step("stage2", "stage 2: LLM2CLIP",
             [llm2clip("stage2", "stage2", "--data", world, "--cache", paths.cache, "--encoder", paths.encoder,
                       "--out", paths.stage2("llm2clip"))], [paths.stage2("llm2clip")]),
        Step("stage2-clip", "stage 2: CLIP baseline",
             [llm2clip("stage2_clip", "stage2", "--model-type", "clip", "--data", world,
                       "--out", paths.stage2("clip"))], [paths.stage2("clip")]),
        Step("eval", "eval: retrieval, zero-shot",
             [llm2clip("eval", "eval", "--data", world, "--split", "test",
                       "--models", ",".join(str(paths.stage2(t) / "final") for t in TOWERS),
                       "--names", ",".join(EVAL_NAMES[t] for t in TOWERS), "--out", paths.eval)], [paths.eval]),
    ]
    for tower in TOWERS:
        llava = paths.llava(tower)
        steps.append(Step(
            f"llava-{tower}", f"LLaVA + {EVAL_NAMES[tower]} tower: pretrain, finetune, export",
            [mllm("llava_pretrain", "pretrain", "--vision-tower", paths.stage2(tower) / "vision_tower",
                  "--llm", paths.llm, "--data", world / "llava" / "pretrain.json", "--image-folder", world,
                  "--out", llava / "pretrain"),
             mllm("llava_finetune", "finetune", "--model", llava / "pretrain" / "final",
                  "--data", world / "llava" / "finetune.json", "--image-folder", world, "--out", llava / "finetune"),
             mllm("llava_export", "export", "--model", llava / "finetune" / "final", "--out", llava / "export",
                  f"image={world / 'images' / 'val' / 'val-00000.png'}")],
            [llava]))
    steps.append(Step(
        "llava-eval", "LLaVA eval (lmms-eval) with the no-image floor",
        [mllm("llava_eval", "eval", "--models", ",".join(str(paths.llava(t) / "export") for t in TOWERS),
              "--names", ",".join(TOWERS), "--world", world, "--out", paths.llava_eval)], [paths.llava_eval]))
    return steps
