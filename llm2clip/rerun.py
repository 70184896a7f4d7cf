"""Reruns of a training step: a finished step is left alone; a resumed one reports its runtime over all runs.

A step is finished when its outputs and its report exist and the report's config is the config asked
for now, up to the keys that do not change the result (checkpoint intervals). Every Trainer-based
command writes its report last, with `config_to_dict(config)` under "config".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# `train` settings that decide when checkpoints are written, not what is trained.
CHECKPOINT_KEYS = ("save_steps", "save_total_limit")


def finished_run(name: str, out: Path, report: Path, outputs: Iterable[Path], config: dict[str, Any],
                 say: Callable[[str], Any] = print) -> dict | None:
    """The report of a finished run of `config` in `out` (said in one line), or None when there is work to do."""
    previous = read_report(report)
    if previous is None or not all(Path(path).exists() for path in outputs):
        return None
    if _decisive(previous.get("config", {})) != _decisive(config):
        return None
    say(f"{name}: already finished ({previous.get('steps')} steps) in {out}; nothing to do")
    return previous


def read_report(report: Path) -> dict | None:
    """The report at `report`, or None when there is none (or an unreadable one, which a rerun replaces)."""
    try:
        return json.loads(Path(report).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def total_runtime(seconds: float, report: Path, resumed: bool) -> float:
    """This run's seconds, plus those in the report (not yet replaced) of the run it resumed."""
    before = (read_report(report) or {}).get("train_runtime_s") if resumed else None
    return seconds + (before or 0.0)


def _decisive(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as its report records it (through JSON), less the checkpoint settings."""
    config = json.loads(json.dumps(config))
    if isinstance(config.get("train"), dict):
        config["train"] = {k: v for k, v in config["train"].items() if k not in CHECKPOINT_KEYS}
    return config
