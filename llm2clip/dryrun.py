"""`--dry-run`: build a command's real-size model on the meta device and report its size, shapes and memory.

Only config.json files are read; no weights, data or GPU are needed. The memory per GPU is for model
states. Trainable parameters take DeepSpeed's own estimates (16-bit weights and gradients, fp32 master
weights and Adam's two moments; `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs`, no offload). DeepSpeed has no estimate for frozen parameters:
they add their 16-bit weights, whole on every GPU under ZeRO-2 and partitioned under ZeRO-3.
Activations come on top; they depend on the batch, the sequence and gradient checkpointing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from llm2clip.errors import InputError
from llm2clip.training import TrainSettings

GIB = 2**30


@dataclass
class Plan:
    """What one command would train: a model on the meta device with its trainable parameters marked."""

    command: str
    model: nn.Module
    shapes: dict[str, str]  # one step's inputs per GPU, described
    train: TrainSettings | None  # None: inference only (embed)
    facts: dict[str, object] = field(default_factory=dict)  # sizes worth checking (hidden size, tokens, ...)


def read_model_config(path: str | Path, what: str) -> PretrainedConfig:
    """The config of a local model directory from its config.json alone (no weights, no remote code)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InputError(f"{what} {path}: no config.json (a dry run reads only the config)")
    data = json.loads(config_file.read_text())
    model_type = data.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise InputError(f"{config_file}: {err}") from None


def on_meta(build):
    """Run `build()` with parameters created on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return build()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def model_states_bytes(model: nn.Module, gpus: int, stage: int) -> int:
    """Model-state memory per GPU under ZeRO `stage` (2 or 3) on `gpus` GPUs of one node."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import model_to_params as zero3_sizes
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, trainable = parameter_counts(model)
    frozen = total - trainable
    if stage == 2:
        _, trained = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
        return trained + 2 * frozen
    _, largest_layer = zero3_sizes(model)  # its total counts meta tensors as one (they share data_ptr 0)
    _, trained, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, num_gpus_per_node=gpus,
                                                          cpu_offload=False, cpu_offload_params=False)
    return trained + 2 * frozen // gpus


def zero_stage(deepspeed: str | None) -> int | None:
    if deepspeed is None or not Path(deepspeed).is_file():
        return None
    return json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage")


def report(plan: Plan, gpus: int = 8) -> dict:
    """Print the plan and return its numbers."""
    total, trainable = parameter_counts(plan.model)
    lines = [f"{plan.command} dry run: {type(plan.model).__name__} built on the meta device from config.json only",
             f"  parameters: {total / 1e6:,.1f}M total, {trainable / 1e6:,.1f}M trainable"]
    lines += [f"  {name}: {value}" for name, value in plan.shapes.items()]
    result = {"total": total, "trainable": trainable, "shapes": dict(plan.shapes), "facts": dict(plan.facts)}
    if plan.train is None:
        weights = 2 * total
        lines.append(f"  memory per GPU: {weights / GIB:.2f} GiB of 16-bit weights (inference; each GPU holds the "
                     "whole model and embeds its share of the captions)")
        result["memory_gib"] = {"weights": weights / GIB}
    else:
        chosen = zero_stage(plan.train.deepspeed)
        memory = {stage: model_states_bytes(plan.model, gpus, stage) / GIB for stage in (2, 3)}
        lines.append(f"  memory per GPU at {gpus} GPUs, model states (DeepSpeed's estimators; precision "
                     f"{plan.train.precision}, batch {plan.train.batch_size} per GPU), activations not included:")
        for stage, gib in memory.items():
            mark = f"  <- {plan.train.deepspeed}" if stage == chosen else ""
            lines.append(f"    ZeRO-{stage}: {gib:7.2f} GiB{mark}")
        if chosen is None:
            lines.append(f"    (train.deepspeed is {plan.train.deepspeed!r}: no ZeRO stage chosen)")
        result["memory_gib"] = memory
        result["zero_stage"] = chosen
    print("\n".join(lines))
    return result
