"""demo_state.json: the finished steps (wall time, command lines, config fingerprint), and which steps to redo.

A step is reused when it finished with the fingerprint it has now and no earlier step is redone. `--force STEP`
redoes STEP and every step after it; so does a step whose config changed, or one that never finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json

STATE_FILE = "demo_state.json"


@dataclass
class Plan:
    start: int  # index of the first step to run; every step before it is reused
    reason: str | None  # one line saying why finished steps are redone, or None


def read_state(out_dir: Path) -> dict:
    """The recorded state ({"steps": {key: record}}), empty when there is none yet."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return {"steps": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}); delete it to rerun every step") from err
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        raise InputError(f"{path} has no 'steps' mapping; delete it to rerun every step")
    return state


def write_state(out_dir: Path, state: dict) -> None:
    atomic_write_json(Path(out_dir) / STATE_FILE, state)


def plan_run(keys: list[str], fingerprints: list[str], state: dict, force: str | None = None) -> Plan:
    """The first step to run, given each step's current fingerprint and what `state` recorded."""
    if force is not None and force not in keys:
        raise InputError(f"--force: unknown step '{force}'; the steps are {', '.join(keys)}")
    done = state["steps"]
    for index, (key, fingerprint) in enumerate(zip(keys, fingerprints)):
        if key == force:
            return Plan(index, f"--force {key}: redoing it and every step after it")
        record = done.get(key)
        if record is None:
            finished_later = [k for k in keys[index + 1:] if k in done]
            reason = f"step '{key}' has not finished: redoing every step after it" if finished_later else None
            return Plan(index, reason)
        if record.get("fingerprint") != fingerprint:
            return Plan(index, f"step '{key}': its config or profile changed since it ran; redoing it and every step after it")
    return Plan(len(keys), None)


def forget_from(state: dict, keys: list[str], start: int) -> dict:
    """`state` without the records of keys[start:], which are about to be redone."""
    return {**state, "steps": {k: v for k, v in state["steps"].items() if k not in keys[start:]}}
