"""LLMEncoder against llm2vec 0.2.3 itself, run in its own venv (scripts/setup_parity_venv.sh).

Every pooling mode, with and without an instruction, long texts cut by doc_max_length and
max_length, a merged model saved by `save_pretrained`, an adapter saved with merge=False, and
the llm2vec MNTP layout (config.json + adapter in one directory). One llm2vec subprocess for all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.pooling import POOLING_MODES

sys.path.insert(0, str(Path(__file__).parent))
from test_encoder import TEXTS, add_lora, build_tokenizer, save_tiny_model  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["the small crimson box right of a big blue circle"] * 6)
PARITY_TEXTS = [*TEXTS, LONG]
INSTRUCTION = "Find the same picture"
SETTINGS = {"max_length": 48, "doc_max_length": 24}  # both truncations happen on LONG
BATCH_SIZE = 3


def run_llm2vec(python: str, jobs: list[dict], work: Path) -> list[dict]:
    (work / "jobs.json").write_text(json.dumps({"threads": 2, "jobs": jobs}))
    result = subprocess.run([python, str(ROOT / "tests" / "parity" / "llm2vec_encode.py"), str(work / "jobs.json"),
                             str(work / "results.json")], capture_output=True, text=True)
    assert result.returncode == 0, f"llm2vec failed:\n{result.stderr[-3000:]}"
    return json.loads((work / "results.json").read_text())


def build_checkpoints(work: Path) -> torch.Tensor:
    """work/base: a merged encoder; work/adapter: a LoRA on it (merge=False); work/mntp: the adapter
    beside the base config.json. Returns the in-memory PEFT encoder's embeddings."""
    encoder = LLMEncoder.from_pretrained(save_tiny_model(work / "raw", "llama", build_tokenizer(), rope_theta=5e5))
    add_lora(encoder, seed=1)
    encoder.save_pretrained(work / "base")
    encoder = LLMEncoder.from_pretrained(work / "base", pooling_mode="weighted_mean", **SETTINGS)
    add_lora(encoder, seed=2)
    encoder.save_pretrained(work / "adapter", merge=False)
    shutil.copytree(work / "adapter", work / "mntp")
    shutil.copy(work / "base" / "config.json", work / "mntp" / "config.json")
    return encoder.encode(PARITY_TEXTS, INSTRUCTION, batch_size=BATCH_SIZE, show_progress=False)


def test_llm2vec_parity(parity_python, tmp_path):
    with_adapter = build_checkpoints(tmp_path)
    base = str(tmp_path / "base")
    expected, jobs = {}, []
    for mode in POOLING_MODES:
        encoder = LLMEncoder.from_pretrained(base, pooling_mode=mode, **SETTINGS)
        for instruction in ("", INSTRUCTION):
            name = f"{mode}-{'instruction' if instruction else 'plain'}"
            expected[name] = encoder.encode(PARITY_TEXTS, instruction, batch_size=BATCH_SIZE, show_progress=False)
            jobs.append({"model": base, "pooling_mode": mode, "instruction": instruction, **SETTINGS})
    expected["adapter"] = with_adapter  # settings come from the adapter's llm2vec_config.json
    jobs.append({"model": base, "adapter": str(tmp_path / "adapter"), "instruction": INSTRUCTION})
    expected["mntp"] = with_adapter
    jobs.append({"model": str(tmp_path / "mntp"), "instruction": INSTRUCTION})
    for job, name in zip(jobs, expected):
        job.update(texts=PARITY_TEXTS, batch_size=BATCH_SIZE, out=str(tmp_path / f"{name}.npy"))

    results = run_llm2vec(parity_python, jobs, tmp_path)
    assert [r["pooling_mode"] for r in results[-2:]] == ["weighted_mean", "weighted_mean"]
    for name, ours in expected.items():
        theirs = torch.from_numpy(np.load(tmp_path / f"{name}.npy"))
        assert theirs.shape == ours.shape, name
        diff = (theirs - ours).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff:.2e}"
