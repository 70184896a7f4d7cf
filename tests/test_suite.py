"""The suite itself: on a fresh clone (no reference venv yet) every check that CI can run is run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_parity_checks_are_not_skipped_on_a_fresh_clone(tmp_path):
    # --setup-plan shows which fixtures each test would set up without running any: nothing is built.
    env = {**os.environ, "LLM2VEC_VENV": str(tmp_path / "missing-venv")}
    run = subprocess.run([sys.executable, "-m", "pytest", "--setup-plan", "-m", "parity", "-p", "no:cacheprovider",
                          "-rs", "tests"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "skipped" not in run.stdout, run.stdout[-3000:]
    parity_tests = [line for line in run.stdout.splitlines() if "::" in line and "parity_python" in line]
    assert len(parity_tests) >= 2, run.stdout[-3000:]  # test_parity.py and test_tiny_llm.py share the venv
