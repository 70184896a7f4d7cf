"""Settings shared by every Trainer-based command, and their translation to `TrainingArguments`."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from llm2clip.errors import InputError
from llm2clip.logs import progress_bars

logger = logging.getLogger(__name__)

# Every schedule of transformers but those that step on evaluation metrics (our runs do not evaluate).
LR_SCHEDULERS = [s.value for s in SchedulerType if s not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)]
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))


@dataclass
class TrainSettings:
    max_steps: int = 300
    batch_size: int = 32  # per device
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # fraction of max_steps, in [0, 1]
    lr_scheduler: str = "cosine"
    precision: str = "auto"  # auto (bf16 where the GPU or CPU computes it natively) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 42
    deepspeed: str | None = None  # path to a DeepSpeed JSON config (ZeRO-2/3)
    dataloader_workers: int = 0
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a bf16 GPU, or a CPU with AVX512-BF16 or AMX.

    On such a CPU, bf16 autocast trains the tiny models 1.2-1.8x faster (bench/cpu_bf16.py); elsewhere
    bf16 is emulated and slower than fp32.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        return {"bf16": native_bf16(), "fp16": False}
    if precision not in ("fp32", "bf16", "fp16"):
        raise InputError(f"train.precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(train: TrainSettings, checkpoint_dir: Path, **overrides) -> TrainingArguments:
    """TrainingArguments for `train`, checkpointing into `checkpoint_dir`."""
    if train.deepspeed is not None and not Path(train.deepspeed).is_file():
        raise InputError(f"DeepSpeed config not found: {train.deepspeed}")
    if not 0 <= train.warmup_ratio <= 1:
        raise InputError(f"train.warmup_ratio must be in [0, 1], got {train.warmup_ratio}")
    if train.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"unknown train.lr_scheduler {train.lr_scheduler!r}; use one of {', '.join(LR_SCHEDULERS)}")
    kwargs = dict(
        output_dir=str(checkpoint_dir),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        # transformers reads a warmup_steps below 1 as a fraction of the steps (epoch-based runs too), but 1.0 as
        # one step: the float just below 1 warms up over every step.
        warmup_steps=min(train.warmup_ratio, math.nextafter(1.0, 0.0)),
        lr_scheduler_type=train.lr_scheduler,
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        deepspeed=train.deepspeed,
        dataloader_num_workers=train.dataloader_workers,
        report_to="none",
        disable_tqdm=not progress_bars(),  # off a terminal: one log line per logging_steps, no bar frames
        # Without use_cpu, torchrun on a CPU machine starts unlinked copies that all act as rank 0.
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision_flags(train.precision),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def resume_checkpoint(train: TrainSettings, checkpoint_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint to resume from, or None for a fresh start.

    The Trainer writes a checkpoint's trainer_state.json last, and not atomically: a run killed while
    saving leaves a newest checkpoint without a readable one, which is passed over.
    """
    if not train.resume or not checkpoint_dir.is_dir():
        return None
    numbered = [(int(match[1]), path) for path in checkpoint_dir.iterdir()
                if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))]
    for _, path in sorted(numbered, reverse=True):
        if _readable_json(path / "trainer_state.json"):
            logger.warning("resuming from %s", path)
            return str(path)
        logger.warning("passing over %s: the run stopped while saving it (no readable trainer_state.json)", path)
    return None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The training loss at each logged step, from a Trainer's `state.log_history` (for reports and plots)."""
    return [{"step": entry["step"], "loss": entry["loss"]} for entry in log_history if "loss" in entry]
