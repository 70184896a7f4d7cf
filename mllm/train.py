"""`mllm pretrain` and `mllm finetune`: LLaVA-1.5's two stages on the transformers Trainer.

pretrain  builds a new Llava (tower + fresh projector + LLM) and trains the projector alone on
          caption data with the plain template (LLaVA-1.5: lr 1e-3, 1 epoch, warmup 0.03, cosine).
finetune  continues a Llava directory (pretrain's final/) on instruction data: the projector and
          the LLM, fully or through LoRA; the tower stays frozen unless vision_lr gives it a rate.
          LLaVA-1.5: lr 2e-5 (LoRA: 2e-4, r 128, alpha 256), 1 epoch, warmup 0.03, cosine.

Outputs under `out_dir`:
    checkpoints/       Trainer checkpoints; a rerun resumes from the newest (a finished run, same config: nothing to do)
    final/             a Llava directory with its processor (LoRA: the adapter and the projector;
                       `mllm export` merges it)
    train_report.json  steps, samples/s, the loss curve, skipped and truncated samples, the config
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor, Trainer, TrainerState, set_seed
from transformers.loss.loss_utils import ForCausalLMLoss

from llm2clip.config import config_to_dict
from llm2clip.data.records import describe_counts
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json, replace_dir
from llm2clip.rerun import finished_run, total_runtime
from llm2clip.sampling import train_dataloader
from llm2clip.training import LoraSettings, TrainSettings, resume_checkpoint, training_arguments
from mllm.builder import BuildSettings, build_llava, load_llava
from mllm.data import IGNORE_INDEX, LlavaCollator, LlavaDataset, ModalityLengthGroupedSampler, read_llava_json
from mllm.templates import chat_template

REPORT = "train_report.json"


@dataclass
class DataSettings:
    path: Path = Path("runs/world/llava/pretrain.json")  # LLaVA JSON (558k pretraining or 665k instruction form)
    image_folder: Path = Path("runs/world")  # the entries' image paths are relative to it
    template: str = "plain"  # plain | vicuna_v1 | llm (the tokenizer's own chat template)
    system_prompt: str | None = None  # vicuna_v1's system line; None: LLaVA's
    model_max_length: int = 2048  # longer samples are truncated (and counted)
    max_samples: int | None = None  # the first N entries only
    group_by_modality_length: bool = True  # batches of image or text-only samples of similar length


@dataclass
class PretrainData(DataSettings):
    max_samples: int | None = 3000
    group_by_modality_length: bool = False  # captions only; LLaVA shuffles them


@dataclass
class FinetuneData(DataSettings):
    path: Path = Path("runs/world/llava/finetune.json")
    template: str = "vicuna_v1"
    max_samples: int | None = 500


@dataclass
class PretrainTrainSettings(TrainSettings):
    max_steps: int = -1  # -1: train for `epochs`
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    save_steps: int = 50
    save_total_limit: int = 1


@dataclass
class FinetuneTrainSettings(TrainSettings):
    max_steps: int = -1  # -1: train for `epochs`
    batch_size: int = 16
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    save_steps: int = 50
    save_total_limit: int = 1


@dataclass
class LlavaLoraSettings(LoraSettings):  # LLaVA-1.5's finetune_lora.sh
    r: int = 128
    alpha: int = 256


@dataclass
class PretrainConfig:
    model: BuildSettings = field(default_factory=BuildSettings)
    data: PretrainData = field(default_factory=PretrainData)
    epochs: float = 1.0  # used when train.max_steps is -1
    out_dir: Path = Path("runs/mllm/pretrain")
    train: PretrainTrainSettings = field(default_factory=PretrainTrainSettings)


@dataclass
class FinetuneConfig:
    model: Path = Path("runs/mllm/pretrain/final")  # a Llava directory
    data: FinetuneData = field(default_factory=FinetuneData)
    tune: Literal["full", "lora"] = "full"  # the LLM's weights, or LoRA adapters on them (the projector trains whole)
    lora: LlavaLoraSettings = field(default_factory=LlavaLoraSettings)
    vision_lr: float | None = None  # None: the vision tower stays frozen; a rate: it trains at that rate
    projector_lr: float | None = None  # None: the projector trains at train.learning_rate, as in LLaVA-1.5
    epochs: float = 1.0  # used when train.max_steps is -1
    out_dir: Path = Path("runs/mllm/finetune")
    train: FinetuneTrainSettings = field(default_factory=FinetuneTrainSettings)


class LlavaTrainer(Trainer):
    """The Trainer with LLaVA's batch order, separate rates for the vision tower and projector, truncation counts."""

    def __init__(self, *args, vision_lr: float | None = None, projector_lr: float | None = None,
                 group_by_modality_length: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision_lr = vision_lr
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length
        self.truncated = 0  # samples cut at model_max_length, on this rank

    def get_train_dataloader(self):
        if not self.group_by_modality_length:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        return train_dataloader(self, ModalityLengthGroupedSampler(
            dataset.lengths, dataset.has_image, self.args.per_device_train_batch_size,
            batches_per_group=self.args.world_size * self.args.gradient_accumulation_steps, seed=self.args.seed,
        ))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = param_groups(self.model, self.args.weight_decay, self.vision_lr, self.projector_lr)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.truncated += inputs.pop("truncated")
        if self.compute_loss_func is answer_loss:
            inputs["logits_to_keep"] = answer_positions(inputs["labels"])
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if "pixel_values" not in inputs:
            # A text-only batch still runs the tower and projector on a blank image, as LLaVA does, so that every
            # rank runs the same modules (ZeRO-3 gathers them collectively) and gives them a (zero) gradient.
            loss = loss + 0.0 * self._blank_image_features().sum()
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore a full (non-LoRA, non-DeepSpeed) Llava from a checkpoint, strictly.

        `save_pretrained` writes LLaVA's original key names (`language_model.model.*`), which the Trainer's
        plain `load_state_dict(strict=False)` would silently skip; `from_pretrained` maps them back.
        A private override: the Trainer has no public hook for loading a checkpoint's weights. Loading them
        in a callback or before `train()` would still leave the Trainer's own load to run (and warn of every
        key as missing), and the saved names are `save_pretrained`'s, not ours to change.
        """
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        full = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
        if not (isinstance(model, LlavaForConditionalGeneration) and full):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = LlavaForConditionalGeneration.from_pretrained(folder, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _blank_image_features(self) -> torch.Tensor:
        llava = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        crop = self.processing_class.image_processor.crop_size
        tower = llava.model.vision_tower
        blank = torch.zeros(1, 3, crop["height"], crop["width"], dtype=tower.dtype, device=tower.device)
        return torch.cat(llava.model.get_image_features(pixel_values=blank).pooler_output)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is learned in at least one sample of the batch."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The model's causal-LM loss, from logits computed at `answer_positions` only.

    The answers are a few percent of a LLaVA sample's tokens (the system line, the questions and the image
    tokens are not learned), so the LM head and the cross-entropy skip the rest: the same loss, a cheaper step.
    """
    targets = labels[:, 1:][:, answer_positions(labels)]
    return ForCausalLMLoss(outputs.logits, None, outputs.logits.shape[-1], num_items_in_batch, IGNORE_INDEX,
                           shift_labels=targets)


def param_groups(model: nn.Module, weight_decay: float, vision_lr: float | None,
                 projector_lr: float | None = None) -> list[dict]:
    """Trainable parameters in groups: decay on matrices only, the vision tower at `vision_lr` and the
    projector at `projector_lr` (None: the optimizer's rate)."""
    rates = {"vision_tower.": vision_lr, "multi_modal_projector.": projector_lr}
    groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = next((key for key in rates if key in name and rates[key] is not None), None)
            groups.setdefault((part, param.ndim >= 2), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, **({"lr": rates[part]} if part else {})}
        for (part, decay), params in groups.items()
    ]


def pretrain(config: PretrainConfig) -> dict:
    args = _arguments(config.train, Path(config.out_dir), config.epochs)  # before loading: ZeRO-3 partitions at load
    if (finished := _finished("pretrain", config, args)) is not None:
        return finished
    set_seed(config.train.seed)
    model, processor = build_llava(config.model)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("model.multi_modal_projector.")
    template = chat_template(config.data.template, processor.tokenizer, config.data.system_prompt)
    return _train("pretrain", config, model, processor, template, args)


def finetune(config: FinetuneConfig) -> dict:
    if config.vision_lr is not None and config.vision_lr <= 0:
        raise InputError(f"vision_lr must be positive (or null to keep the tower frozen), got {config.vision_lr}")
    if config.projector_lr is not None and config.projector_lr <= 0:
        raise InputError(f"projector_lr must be positive (or null for train.learning_rate), got {config.projector_lr}")
    args = _arguments(config.train, Path(config.out_dir), config.epochs,
                      ddp_find_unused_parameters=config.vision_lr is not None)  # the tower's top layers go unused
    if (finished := _finished("finetune", config, args)) is not None:
        return finished
    set_seed(config.train.seed)
    model, processor = load_llava(Path(config.model).resolve())  # absolute: LoRA adapters record their base
    template = chat_template(config.data.template, processor.tokenizer, config.data.system_prompt)
    processor.chat_template = processor.tokenizer.chat_template = template  # inference renders as training did
    for name, param in model.named_parameters():
        param.requires_grad = config.vision_lr is not None or not name.startswith("model.vision_tower.")
    if config.tune == "lora":
        model = _with_lora(model, config.lora, train_tower=config.vision_lr is not None)
    return _train("finetune", config, model, processor, template, args, vision_lr=config.vision_lr,
                  projector_lr=config.projector_lr)


def _arguments(train: TrainSettings, out: Path, epochs: float, **overrides):
    if train.max_steps < 0 and epochs <= 0:
        raise InputError(f"epochs must be positive when train.max_steps is -1, got {epochs}")
    return training_arguments(train, out / "checkpoints", num_train_epochs=epochs, remove_unused_columns=False,
                              **overrides)


def _finished(stage: str, config: PretrainConfig | FinetuneConfig, args) -> dict | None:
    """The report of a finished run of `config` (rank 0; {} on the others), or None when there is work to do."""
    out = Path(config.out_dir)
    main = args.process_index == 0
    report = finished_run(f"mllm {stage}", out, out / REPORT, [out / "final"], config_to_dict(config),
                          say=print if main else lambda *a, **k: None)
    return report if report is None or main else {}


def _with_lora(model: LlavaForConditionalGeneration, lora: LoraSettings, train_tower: bool) -> PeftModel:
    """LoRA on the LLM's linear layers; the projector (and an unfrozen tower) train whole and are saved with it."""
    targets = "|".join(lora.target_modules)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=rf"model\.language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector"] + (["vision_tower"] if train_tower else []),
    )
    return get_peft_model(model, config)


def _train(stage: str, config: PretrainConfig | FinetuneConfig, model: nn.Module, processor: LlavaProcessor,
           template: str, args, vision_lr: float | None = None, projector_lr: float | None = None) -> dict:
    out, data = Path(config.out_dir), config.data
    main = args.process_index == 0
    say = print if main else lambda *a, **k: None
    samples, skipped = read_llava_json(data.path, data.image_folder, data.max_samples)
    dataset = LlavaDataset(samples, processor, template, data.model_max_length)
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: full sizes
    trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    say(f"mllm {stage}: {len(dataset)} samples ({sum(dataset.has_image)} with an image), skipped {describe_counts(skipped, 'nothing')}; "
        f"template {data.template}; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable")

    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=LlavaCollator(processor.tokenizer.pad_token_id),
        processing_class=processor, vision_lr=vision_lr, projector_lr=projector_lr,
        group_by_modality_length=data.group_by_modality_length,
        compute_loss_func=answer_loss,
    )
    resume_from = resume_checkpoint(config.train, out / "checkpoints")
    start_step = TrainerState.load_from_json(f"{resume_from}/trainer_state.json").global_step if resume_from else 0
    result = trainer.train(resume_from_checkpoint=resume_from)
    counts = torch.tensor([trainer.truncated], device=args.device)
    truncated = int(trainer.accelerator.reduce(counts, reduction="sum").item())

    final = out / "final"
    _save_final(trainer, final)
    if not main:
        return {}
    steps = trainer.state.global_step - start_step
    seconds = result.metrics["train_runtime"]
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    curve = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    report = {
        "stage": stage,
        "steps": trainer.state.global_step,
        "resumed_from_step": start_step,
        "steps_this_run": steps,
        "train_runtime_s": round(total_runtime(seconds, out / REPORT, resumed=start_step > 0), 1),  # over all runs
        "runtime_this_run_s": round(seconds, 1),
        "samples_per_s": round(steps * global_batch / seconds, 2) if steps else None,  # this run's
        "global_batch": global_batch,
        "samples": len(dataset),
        "skipped": dict(skipped),
        "truncated": truncated,  # samples cut at model_max_length, counted each time one was drawn
        "trainable_parameters": trainable,
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "config": config_to_dict(config),
    }
    atomic_write_json(out / REPORT, report)
    losses = f"{curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}" if curve else "not logged"
    say(f"mllm {stage}: {report['steps']} steps ({steps} this run, {report['samples_per_s']} samples/s), "
        f"loss {losses}, {truncated} truncated; wrote {final} and {out / REPORT}")
    return report


def _save_final(trainer: Trainer, final: Path) -> None:
    """Every rank joins `save_model` (DeepSpeed gathers there); rank 0 swaps the directory in."""
    partial = final.with_name(f".{final.name}.partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))  # the model (or LoRA adapter) and the processor
    if trainer.is_world_process_zero():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs
        replace_dir(partial, final)
