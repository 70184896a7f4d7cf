"""A stopped run, rerun, continues the uninterrupted run's loss curve exactly, for every trainer.

Each test trains once uninterrupted, with a checkpoint every few steps. A second run starts in a fresh out dir
holding only a copy of one of those checkpoints (what a kill right after it leaves behind) and resumes from it;
every loss it logs after the checkpoint must equal the uninterrupted run's (CPU, fp32). The checkpoint lies in
the middle of a later epoch, so the Trainer's skipped batches, the epoch's order and each item's own draws
(caption choice, MNTP masks) all have to replay. Stage 2 is also killed for real (SIGKILL) and rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mllm_data import make_llm, make_tower, write_world
from test_stage2 import TINY, tiny
from transformers import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from llm2clip.config import load_config
from llm2clip.stage2.train import train_stage2
from llm2clip.text.contrastive import ContrastiveConfig, train_contrastive
from llm2clip.text.mntp import MNTPConfig, train_mntp
from llm2clip.training import TrainSettings, resume_checkpoint
from mllm.train import FinetuneConfig, PretrainConfig, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def logged_losses(out: Path) -> dict[int, float]:
    """Step -> logged loss, from the newest checkpoint under `out` (its log history spans every run)."""
    state = TrainerState.load_from_json(f"{get_last_checkpoint(str(out / 'checkpoints'))}/trainer_state.json")
    return {entry["step"]: entry["loss"] for entry in state.log_history if "loss" in entry}


def checkpoint_copy(uninterrupted: Path, step: int, fresh: Path) -> Path:
    """A fresh out dir holding only checkpoint `step` of the uninterrupted run."""
    name = f"checkpoint-{step}"
    shutil.copytree(uninterrupted / "checkpoints" / name, fresh / "checkpoints" / name)
    return fresh


def assert_continues(resumed: dict[int, float], uninterrupted: dict[int, float], after: int) -> None:
    assert sorted(resumed) == sorted(uninterrupted)
    later = [step for step in sorted(uninterrupted) if step > after]
    assert later, "nothing was trained after the resume point"
    for step in later:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), (
            f"step {step} after resuming at {after}: {resumed[step]} against {uninterrupted[step]} uninterrupted")


def settings(**overrides) -> TrainSettings:
    """8 steps, a log line per step, a checkpoint every 2 and all of them kept."""
    values = dict(max_steps=8, batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=2, save_total_limit=10,
                  warmup_ratio=0.0, precision="fp32")
    return TrainSettings(**{**values, **overrides})


def test_mntp_resume(tmp_path, causal_lm_dir, small_world):
    def run(out: Path) -> dict[int, float]:
        # 6 corpus lines pack into 9 blocks: 3 steps per epoch, so checkpoint 4 is one step into the second epoch.
        train_mntp(MNTPConfig(model=causal_lm_dir, corpus=small_world / "corpus.txt", out_dir=out, max_lines=6,
                              max_seq_length=32, train=settings()))
        return logged_losses(out)

    uninterrupted = run(tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / "mntp_report.json").read_text())["config"]["train"]["max_steps"] == 8
    assert_continues(run(checkpoint_copy(tmp_path / "whole", 4, tmp_path / "resumed")), uninterrupted, after=4)


def test_contrastive_resume(tmp_path, encoder_dir, small_world):
    def run(out: Path) -> dict[int, float]:
        # 10 short_long, 5 short_short and 5 long_long pairs make 4 one-kind batches of 4 per epoch (the 2 plain-text
        # pairs fill none): checkpoint 6 is in the second epoch.
        train_contrastive(ContrastiveConfig(model=encoder_dir, data=small_world, corpus=small_world / "corpus.txt",
                                            out_dir=out, max_length=48, train=settings()))
        return logged_losses(out)

    uninterrupted = run(tmp_path / "whole")
    assert_continues(run(checkpoint_copy(tmp_path / "whole", 6, tmp_path / "resumed")), uninterrupted, after=6)


STAGE2_STEPS = ["train.max_steps=12", "train.save_steps=3", "train.save_total_limit=10"]


@pytest.fixture(scope="module")
def stage2_uninterrupted(tmp_path_factory, small_world, cache_dir, encoder_dir) -> tuple[Path, dict[int, float]]:
    """12 steps over the 20 images in batches of 4 (5 per epoch), a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("stage2") / "whole"
    train_stage2(tiny(small_world, cache_dir, encoder_dir, out, *STAGE2_STEPS))
    return out, logged_losses(out)


@pytest.mark.parametrize("workers", [0, 1])
def test_stage2_resume(tmp_path, small_world, cache_dir, encoder_dir, stage2_uninterrupted, workers):
    whole, uninterrupted = stage2_uninterrupted
    resumed = checkpoint_copy(whole, 6, tmp_path / "resumed")
    train_stage2(tiny(small_world, cache_dir, encoder_dir, resumed, *STAGE2_STEPS,
                      f"train.dataloader_workers={workers}"))
    assert json.loads((resumed / "train_report.json").read_text())["resumed_from_step"] == 6
    assert_continues(logged_losses(resumed), uninterrupted, after=6)


@pytest.mark.slow
def test_stage2_sigkill_then_rerun(tmp_path, small_world, cache_dir, encoder_dir, stage2_uninterrupted):
    _, uninterrupted = stage2_uninterrupted
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "llm2clip.cli", "stage2", "--data", str(small_world), "--cache", str(cache_dir),
            "--encoder", str(encoder_dir), "--out", str(out), *TINY, *STAGE2_STEPS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while resume_checkpoint(TrainSettings(), out / "checkpoints") is None:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # anywhere after the first checkpoint, maybe while saving another
    process.wait()
    assert not (out / "train_report.json").exists(), "the run finished before the kill"

    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    report = json.loads((out / "train_report.json").read_text())
    assert 3 <= report["resumed_from_step"] < 12 and report["steps"] == 12
    assert_continues(logged_losses(out), uninterrupted, after=report["resumed_from_step"])


@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava")
    return {"tower": make_tower(root / "tower"), "llm": make_llm(root / "llm"), "world": write_world(root / "world")}


def llava_run(stage: str, parts: dict[str, Path], out: Path, *overrides: str) -> dict[int, float]:
    world = parts["world"]
    common = [f"data.path={world}/{stage}.json", f"data.image_folder={world}", f"out_dir={out}", "train.batch_size=4",
              "train.logging_steps=1", "train.save_steps=1", "train.save_total_limit=10", "train.warmup_ratio=0",
              "train.learning_rate=1e-3", "train.precision=fp32", *overrides]
    if stage == "pretrain":
        pretrain(load_config(PretrainConfig, None, [
            f"model.vision_tower={parts['tower']}", f"model.llm={parts['llm']}", *common]))
    else:
        finetune(load_config(FinetuneConfig, None, common))
    return logged_losses(out)


def test_llava_pretrain_resume(tmp_path, llava_parts):
    # 8 captions in batches of 4: 2 steps per epoch; checkpoint 3 is in the second epoch.
    uninterrupted = llava_run("pretrain", llava_parts, tmp_path / "whole", "train.max_steps=5")
    resumed = checkpoint_copy(tmp_path / "whole", 3, tmp_path / "resumed")
    assert_continues(llava_run("pretrain", llava_parts, resumed, "train.max_steps=5"), uninterrupted, after=3)


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_llava_finetune_resume(tmp_path, llava_parts, tune):
    llava_run("pretrain", llava_parts, tmp_path / "pre", "train.max_steps=1")
    # 9 samples grouped by modality in batches of 4: 3 steps per epoch; checkpoint 4 is in the second epoch.
    # LoRA dropout draws from the global RNG that the checkpoint restores.
    overrides = [f"model={tmp_path / 'pre' / 'final'}", "train.max_steps=6", f"tune={tune}", "lora.r=4",
                 "lora.alpha=8", "lora.dropout=0.1"]
    uninterrupted = llava_run("finetune", llava_parts, tmp_path / "whole", *overrides)
    resumed = checkpoint_copy(tmp_path / "whole", 4, tmp_path / "resumed")
    assert_continues(llava_run("finetune", llava_parts, resumed, *overrides), uninterrupted, after=4)


def test_a_checkpoint_the_kill_cut_short_is_passed_over(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, "{}"), (6, "")):  # killed while writing checkpoint 6's trainer state
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (checkpoints / "checkpoint-8").mkdir()  # killed before writing it
    (checkpoints / "tokenizer").mkdir()
    assert resume_checkpoint(TrainSettings(), checkpoints) == str(checkpoints / "checkpoint-4")
    assert resume_checkpoint(TrainSettings(resume=False), checkpoints) is None
    assert resume_checkpoint(TrainSettings(), tmp_path / "none") is None
