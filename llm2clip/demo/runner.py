"""Run the demo: each step's commands as subprocesses, logged to OUT/logs/<step>.log, then the report.

The console gets one line per step (`[ 3/13] stage 1b: caption contrastive ... done in 4m12s`), and a bar
over the steps on a terminal. A failed step prints its log's last lines and stops the demo.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm

from llm2clip.demo.config import ROOT, DemoConfig, check_config
from llm2clip.demo.state import forget_from, plan_run, read_state, write_state
from llm2clip.demo.steps import Paths, Step, build_steps
from llm2clip.errors import InputError

TAIL_LINES = 20


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def child_env() -> dict[str, str]:
    """The children import this checkout's packages, whatever the current directory, and their idle OpenMP
    threads sleep unless the environment says otherwise (spinning ones slow every step on shared cores; see mllm.cli)."""
    path = os.environ.get("PYTHONPATH")
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run_step(step: Step, log_path: Path) -> None:
    """Run the step's commands in order, their output going to `log_path`; raise on the first failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        for call in step.calls:
            argv = call.argv()
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  env=child_env()).returncode
            if code != 0:
                raise StepFailed(step, code, log_path)


class StepFailed(InputError):
    def __init__(self, step: Step, code: int, log_path: Path):
        self.log_path = log_path
        super().__init__(f"step '{step.key}' ({step.title}) failed with exit code {code}; its log: {log_path}")


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def _remove_outputs(step: Step, out_dir: Path) -> None:
    """Delete what a redone step wrote (only ever under out_dir), so its command starts afresh."""
    for path in step.outputs:
        if out_dir.resolve() not in Path(path).resolve().parents:
            raise InputError(f"refusing to delete {path}: it is not under the demo's out_dir {out_dir}")
        if Path(path).is_dir():
            shutil.rmtree(path)
        elif Path(path).exists():
            Path(path).unlink()


class Console:
    """One line per step; on a terminal, a bar over the steps as well."""

    def __init__(self, total: int):
        self.total = total
        self.bar = tqdm(total=total, unit="step", leave=False, disable=not sys.stdout.isatty(), file=sys.stdout)

    def start(self, index: int, title: str) -> str:
        head = f"[{index + 1:2d}/{self.total}] {title} ..."
        if self.bar.disable:
            print(head, end="", flush=True)
        else:
            self.bar.set_description(title)
        return head

    def finish(self, head: str, outcome: str) -> None:
        if self.bar.disable:
            print(f" {outcome}", flush=True)
        else:
            self.bar.write(f"{head} {outcome}")
            self.bar.update()

    def close(self) -> None:
        self.bar.close()


def run_demo(config: DemoConfig) -> dict:
    """Run every step not yet finished, then write the report; return the report."""
    from llm2clip.demo.report import write_report

    overrides = check_config(config)
    steps = build_steps(config, overrides)
    out_dir = Path(config.out_dir)
    paths = Paths(config)
    keys = [step.key for step in steps]
    state = read_state(out_dir)
    plan = plan_run(keys, [step.fingerprint() for step in steps], state, config.force)
    if plan.reason:
        print(f"demo: {plan.reason}")
    state = {**forget_from(state, keys, plan.start), "profile": config.profile}
    for step in steps[plan.start:]:
        if step.given is None:
            _remove_outputs(step, out_dir)
    write_state(out_dir, state)

    console = Console(len(steps) + 1)
    try:
        for index, step in enumerate(steps):
            head = console.start(index, step.title)
            if index < plan.start:
                console.finish(head, f"reused ({format_seconds(state['steps'][step.key]['seconds'])} when it ran)")
                continue
            record = {"fingerprint": step.fingerprint(), "commands": [shlex.join(c.argv()) for c in step.calls]}
            if step.given is not None:
                state["steps"][step.key] = {**record, "seconds": 0.0, "given": str(step.given)}
                console.finish(head, f"given: {step.given}")
            else:
                start = time.perf_counter()
                try:
                    run_step(step, paths.logs / f"{step.key}.log")
                except StepFailed as failed:
                    console.finish(head, f"FAILED after {format_seconds(time.perf_counter() - start)}")
                    print(f"--- last lines of {failed.log_path}:\n{log_tail(failed.log_path)}", end="", file=sys.stderr)
                    raise
                seconds = time.perf_counter() - start
                state["steps"][step.key] = {**record, "seconds": round(seconds, 1), "load_1min": os.getloadavg()[0]}
                console.finish(head, f"done in {format_seconds(seconds)}")
            write_state(out_dir, state)
        head = console.start(len(steps), "report")
        start = time.perf_counter()
        report = write_report(config, steps, state, reused=set(keys[: plan.start]))
        console.finish(head, f"done in {format_seconds(time.perf_counter() - start)}")
    finally:
        console.close()
    print(f"demo: {out_dir / 'report.md'} (total {format_seconds(report['total_seconds'])}; "
          f"claims: {', '.join(c['id'] + ' ' + c['result'] for c in report['claims'])})")
    return report
