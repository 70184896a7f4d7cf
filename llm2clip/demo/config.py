"""The demo's config: where its inputs and outputs are, each command's config file, profiles and claim targets.

configs/demo.yaml is the default (`--config` another file to point the pipeline at real models and data).
A profile maps a command name (`COMMAND_NAMES`) to the KEY=VALUE overrides that command gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm2clip.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"

# Every CLI call the demo makes, by the name its profile overrides and config file go under.
COMMAND_NAMES = (
    "synth", "tiny_llm", "mntp", "contrastive", "cra", "embed", "stage2", "stage2_clip", "eval",
    "llava_pretrain", "llava_finetune", "llava_export", "llava_eval",
)


@dataclass
class Targets:
    """The claims' bars (points are percentage points of R@1 or CRA)."""

    cra_gain_points: float = 20.0  # (a) CRA after stage 1 minus before, short and long captions
    long_r1_margin_points: float = 10.0  # (b) long-caption R@1, LLM2CLIP minus CLIP, I2T and T2I
    short_r1_min: float = 0.10  # (c) short-caption R@1 of LLM2CLIP (and at least CLIP's)
    french_r1_chance_multiple: float = 5.0  # (d) French R@1 of LLM2CLIP over chance
    llava_margin_points: float = 0.0  # (e) LLaVA overall, LLM2CLIP tower minus CLIP tower
    noise_z: float = 2.0  # a result within this many standard errors of its floor is a FAIL


@dataclass
class DemoConfig:
    out_dir: Path = Path("runs/demo")
    profile: str = "full"
    force: str | None = None  # a step key: redo it and every step after it
    world: Path | None = None  # an existing world folder: the synth step is skipped
    llm: Path | None = None  # an existing causal LM directory: the tiny-LLM step is skipped
    configs: dict[str, str] = field(default_factory=dict)  # command name -> its YAML config (none: built-in)
    profiles: dict[str, dict] = field(default_factory=dict)  # profile -> command name -> [KEY=VALUE, ...]
    targets: Targets = field(default_factory=Targets)
    examples: int = 4  # test images in the retrieval-examples figure


def check_config(config: DemoConfig) -> dict[str, list[str]]:
    """The chosen profile's overrides by command name; a bad profile, name or config path is a one-line error."""
    if config.profile not in config.profiles:
        raise InputError(f"unknown profile '{config.profile}'; the config defines: {', '.join(config.profiles) or 'none'}")
    for name, path in config.configs.items():
        if name not in COMMAND_NAMES:
            raise InputError(f"configs: unknown command '{name}'; choose from {', '.join(COMMAND_NAMES)}")
        if path is not None and not Path(path).is_file():
            raise InputError(f"configs.{name}: config file not found: {path}")
    profile = config.profiles[config.profile] or {}
    if not isinstance(profile, dict):
        raise InputError(f"profiles.{config.profile} must map command names to override lists")
    overrides = {}
    for name, items in profile.items():
        if name not in COMMAND_NAMES:
            raise InputError(f"profiles.{config.profile}: unknown command '{name}'; choose from {', '.join(COMMAND_NAMES)}")
        items = items or []
        if not isinstance(items, list) or not all(isinstance(item, str) and "=" in item for item in items):
            raise InputError(f"profiles.{config.profile}.{name} must be a list of KEY=VALUE strings, got {items!r}")
        overrides[name] = items
    for path, what in ((config.world, "world"), (config.llm, "llm")):
        if path is not None and not Path(path).is_dir():
            raise InputError(f"{what}: directory not found: {path}")
    return overrides
