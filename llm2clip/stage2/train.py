"""`llm2clip stage2`: train a CLIP vision tower against frozen LLM caption embeddings, or the CLIP baseline.

model_type llm2clip: an `LLM2CLIPModel` (vision tower + adapter over the cached LLM embeddings). With
`adapter.whiten` the adapter's input is whitened with statistics fitted on the cache before training.
model_type clip: the baseline, a plain `transformers.CLIPModel` with its own 77-token text transformer,
trained on the same vision config, data, caption mix, steps, seed and loss by the same trainer.
Both take one path through `compute_loss`: the model's image and text features into one loss module.

Outputs under `out_dir`:
    checkpoints/       Trainer checkpoints; a rerun with a changed config (e.g. more steps) resumes from the newest
                       and extends its loss curve; a rerun of a finished run with the same config does nothing
    final/             the model (safetensors), its image processor (and the baseline's tokenizer)
    vision_tower/      the vision tower alone, a `CLIPVisionModel` with its image processor
    train_report.json  steps, samples/s, the loss curve, skipped samples and the config
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerState,
    set_seed,
)

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel, export_vision_tower
from llm2clip.clip.modeling_llm2clip import clip_image_processor
from llm2clip.config import config_to_dict
from llm2clip.data.records import ImageText, describe_counts, load_image_texts
from llm2clip.embed.cache import EmbeddingCache
from llm2clip.embed.whitening import fit_whitening
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir, atomic_write_json, replace_dir
from llm2clip.losses import Stage2Loss, stage2_loss
from llm2clip.rerun import finished_run, total_runtime
from llm2clip.sampling import SeededShuffle, train_dataloader
from llm2clip.stage2.data import (
    CacheRows,
    CaptionMix,
    ImageCaptionCollator,
    RecordTexts,
    image_caption_dataset,
    train_caption_tokenizer,
)
from llm2clip.stage2.webdataset import (
    SKIP_REASONS,
    CacheRowsByKey,
    ShardDataset,
    ShardLoader,
    expand_shards,
    own_captions,
    shard_captions,
)
from llm2clip.training import TrainSettings, resume_checkpoint, training_arguments
from llm2clip.weights import require_weights


@dataclass
class VisionSettings:
    pretrained: Path | None = None  # local HF CLIP checkpoint (CLIPModel or CLIPVisionModel); None: a new tower
    image_size: int = 64  # the sizes below make the new tower
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 768


@dataclass
class AdapterSettings:  # llm2clip only
    input_dim: int | None = None  # LLM embedding dim; None: the cache's
    depth: int = 2
    hidden_dim: int = 512
    # Whiten the cached embeddings first, fitted on the cache (README, world format 2: long R@1 15.6 -> 32.2).
    whiten: bool = True
    # Added to each eigenvalue, as a fraction of the largest (long R@1, format 2: 1e-3 30.0, 1e-4 32.2;
    # format 3 at 1-6 objects: 1e-6 29.4 against 32.8).
    whiten_eps: float = 1e-4
    # The paper's adapter (LLM2CLIP's release): L2-normalise the input, and a bias on the text projection.
    input_l2norm: bool = False
    projection_bias: bool = False


@dataclass
class TextTowerSettings:  # the clip baseline only
    tokenizer: Path | None = None  # None: the pretrained CLIP's own, else a BPE trained on the training captions
    vocab_size: int = 4096  # of the trained BPE (the world needs fewer)
    max_length: int = 77  # CLIP's context: longer captions are truncated
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024


@dataclass
class Stage2Config:
    model_type: Literal["llm2clip", "clip"] = "llm2clip"
    data: Path = Path("runs/world")  # world directory, .jsonl, COCO-Karpathy or ShareGPT4V .json
    split: str | None = "train"  # None: every split (as a cache built with split=null)
    image_root: Path | None = None  # image paths are relative to this (default: the data file's directory)
    max_images: int | None = None  # the first N images only (the cache must cover the same N)
    shards: str | None = None  # tar shards (dirs, globs, {000..099} ranges); images and captions come from them
    shuffle_buffer: int = 1000  # samples per DataLoader worker shuffled across shards
    cache: Path = Path("runs/cache/train")  # caption-embedding cache of `data` (llm2clip)
    encoder: Path | None = Path("runs/stage1/contrastive/merged")  # the cache must come from it; None: trust it
    caption_mix: dict[str, float] = field(default_factory=lambda: {"short": 0.5, "long": 0.5, "translated": 0.0})
    loss: Literal["clip", "siglip"] = "clip"
    projection_dim: int = 256
    unlocked_vision_groups: int = -1  # train the last N groups of the vision side (open_clip style); -1: all
    vision: VisionSettings = field(default_factory=VisionSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    text: TextTowerSettings = field(default_factory=TextTowerSettings)
    out_dir: Path = Path("runs/stage2/llm2clip")
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(
            max_steps=400, batch_size=128, learning_rate=1e-3, weight_decay=0.1, warmup_ratio=0.05,
            logging_steps=10, save_steps=100, dataloader_workers=1,
        )
    )


class ClampLogitScale(TrainerCallback):
    """Clamp the log logit scale into [0, max] after every optimizer step (the forward clamps it too)."""

    def __init__(self, maximum: float):
        self.maximum = maximum

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            model.logit_scale.clamp_(0, self.maximum)


class Stage2Trainer(Trainer):
    """The Trainer with a contrastive compute_loss, open_clip's weight decay and shard-aware loading.

    `loss` (`llm2clip.losses.STAGE2_LOSSES`) gives the loss module and the clamp on the log logit scale.
    """

    def __init__(self, *args, loss: Stage2Loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss.module()
        self.logit_scale_max = loss.logit_scale_max
        self.read_skips: Counter[str] = Counter()  # samples skipped while reading tar shards, on this rank

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.read_skips.update(inputs.pop("skipped", {}))
        outputs = model(**inputs)  # through the DDP / DeepSpeed wrapper, so gradients synchronise
        core = self.accelerator.unwrap_model(model)
        logit_scale = core.logit_scale.clamp(0, self.logit_scale_max).exp()
        logit_bias = getattr(core, "logit_bias", None)
        loss = self.loss_fn(outputs.image_embeds, outputs.text_embeds, logit_scale, logit_bias)
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices only: biases, norms, the class token and the logit scale are exempt."""
        return [name for name, param in model.named_parameters() if param.ndim >= 2]

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, ShardDataset):
            # (epoch, index) keys: each image's caption draw derives from them.
            return train_dataloader(self, SeededShuffle(len(self.train_dataset), self.args.seed))
        # Each rank already reads its own shards: accelerate must neither dispatch nor re-shard the batches.
        return ShardLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                           num_workers=self.args.dataloader_num_workers,
                           pin_memory=self.args.dataloader_pin_memory,
                           drop_last=True)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs["logit_scale"] = round(self.model.logit_scale.exp().item(), 3)
        super().log(logs, *args, **kwargs)


def train_stage2(config: Stage2Config) -> dict:
    _check(config)
    mix = CaptionMix(config.caption_mix)
    out = Path(config.out_dir)
    checkpoint_dir = out / "checkpoints"
    args = training_arguments(config.train, checkpoint_dir, remove_unused_columns=False, dataloader_drop_last=True,
                              ddp_find_unused_parameters=False)
    main = args.process_index == 0
    say = print if main else lambda *a, **k: None
    finished = finished_run("stage2", out, out / "train_report.json", [out / "final", out / "vision_tower"],
                            config_to_dict(config), say)
    if finished is not None:
        return finished if main else {}
    resume_from = resume_checkpoint(config.train, checkpoint_dir)
    shards = expand_shards(config.shards) if config.shards else None

    # The text side: cache rows (llm2clip) or captions to tokenise (clip baseline).
    cache = tokenizer = None
    skips: Counter[str] = Counter()  # entries of the data file, then samples, left out
    records = _records(config, skips) if config.model_type == "llm2clip" or shards is None else None
    if config.model_type == "llm2clip":
        cache = _checked_cache(config, records, mix)
    else:
        captions = map(RecordTexts(records), range(len(records))) if records else shard_captions(shards)
        tokenizer = _baseline_tokenizer(config, captions, mix, out, resuming=resume_from is not None, save=main)

    # The data: a map-style dataset checked up front, or tar shards checked as they are read.
    if shards is not None:
        captions = CacheRowsByKey(cache, records) if cache is not None else own_captions
        dataset = ShardDataset(shards, mix, captions, seed=config.train.seed, shuffle_buffer=config.shuffle_buffer,
                               rank=args.process_index, world_size=args.world_size)
        say(f"stage2: {len(shards)} tar shard(s); bad samples are skipped and counted as they are read")
    else:
        captions = CacheRows(cache) if cache is not None else RecordTexts(records)
        dataset, dataset_skips, examples = image_caption_dataset(records, captions, mix, seed=config.train.seed)
        skips.update(dataset_skips)
        say(f"stage2: {len(dataset)} of {len(records)} images usable; skipped {describe_counts(skips, 'nothing')}")
        for reason, example in examples.items():
            say(f"  e.g. {reason}: {example}")

    set_seed(config.train.seed)
    model = build_model(config, cache.dim if cache else None, tokenizer)
    if cache is not None:
        manifest = cache.manifest  # so eval embeds new captions as the cache did, with this encoder only
        encoder = Path(config.encoder or manifest["encoder"]).resolve()  # where it is now, not when cached
        model.config.text_encoder_name_or_path = str(encoder)
        model.config.text_encoder_relative_path = os.path.relpath(encoder, (out / "final").resolve())
        model.config.text_encoder_fingerprint = manifest["weight_hash"]
        model.config.text_encoder_pooling_mode = manifest["pooling_mode"]
        model.config.text_encoder_max_length = manifest["max_length"]
        if config.adapter.whiten:
            model.set_whitening(*fit_whitening(cache, mix.weights, config.adapter.whiten_eps, device=args.device))
            say(f"stage2: the adapter whitens its input (fitted on the cache's {', '.join(mix.kinds)} rows)")
    processor = _image_processor(config.vision, model.config.vision_config.image_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"stage2: {config.model_type} model, {trainable / 1e6:.2f}M trainable of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {config.loss} loss; "
        f"caption mix {mix.weights}; {config.train.max_steps} steps of {args.per_device_train_batch_size} x "
        f"{args.gradient_accumulation_steps} x {args.world_size}")

    loss = stage2_loss(config.loss)
    trainer = Stage2Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ImageCaptionCollator(processor, cache, tokenizer, max_length=config.text.max_length),
        loss=loss,
        callbacks=[ClampLogitScale(loss.logit_scale_max)],
    )
    start_step = TrainerState.load_from_json(f"{resume_from}/trainer_state.json").global_step if resume_from else 0
    result = trainer.train(resume_from_checkpoint=resume_from)
    skips.update(_sum_over_ranks(trainer))

    final = out / "final"
    _save_final(trainer, final, [processor] + ([tokenizer] if tokenizer is not None else []))
    if not main:
        return {}
    _export_tower(config.model_type, final, processor, out / "vision_tower")
    steps = trainer.state.global_step - start_step
    seconds = result.metrics["train_runtime"]
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    curve = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    report = {
        "model_type": config.model_type,
        "steps": trainer.state.global_step,
        "resumed_from_step": start_step,
        "steps_this_run": steps,
        "train_runtime_s": round(total_runtime(seconds, out / "train_report.json", resumed=start_step > 0), 1),  # over all runs
        "runtime_this_run_s": round(seconds, 1),
        "samples_per_s": round(steps * global_batch / seconds, 1) if steps else None,  # this run's
        "global_batch": global_batch,
        "images": len(dataset) if shards is None else None,
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        "logit_scale": round(model.logit_scale.exp().item(), 3),
        "skipped": dict(skips),
        "loss_curve": curve,
        "text_encoder": model.config.text_encoder_name_or_path if cache is not None else None,
        "config": config_to_dict(config),
    }
    atomic_write_json(out / "train_report.json", report)
    losses = f"{curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}" if curve else "not logged"
    say(f"stage2: {report['steps']} steps ({steps} this run, {report['samples_per_s']} samples/s), loss {losses}, "
        f"logit scale {report['logit_scale']}; skipped {describe_counts(skips, 'nothing')}")
    say(f"stage2: wrote {final}, {out / 'vision_tower'} and {out / 'train_report.json'}")
    return report


def _check(config: Stage2Config) -> None:
    if config.model_type == "clip" and config.loss != "clip":
        raise InputError("the plain CLIP baseline trains with loss: clip (CLIPModel has no logit bias for siglip)")
    if config.shards is not None and config.max_images is not None:
        raise InputError("max_images limits map-style data; it does not apply to tar shards")
    if config.max_images is not None and config.max_images < 1:
        raise InputError(f"max_images must be at least 1, got {config.max_images}")
    if config.shuffle_buffer < 1:
        raise InputError(f"shuffle_buffer must be at least 1, got {config.shuffle_buffer}")
    pretrained = config.vision.pretrained
    if pretrained is not None:  # before the data and the cache are read
        if not (Path(pretrained) / "config.json").is_file():
            raise InputError(f"vision.pretrained {pretrained}: no config.json; expected a local Hugging Face CLIP "
                             "checkpoint directory")
        require_weights(pretrained)


def _records(config: Stage2Config, skipped: Counter[str]) -> list[ImageText]:
    return load_image_texts(config.data, config.split, config.image_root, skipped)[: config.max_images]


def _checked_cache(config: Stage2Config, records: list[ImageText], mix: CaptionMix) -> EmbeddingCache:
    """The cache, once it is known to hold this dataset's captions, embedded by `config.encoder`."""
    cache = EmbeddingCache(config.cache)
    if config.encoder is not None and not Path(config.encoder).is_dir():
        raise InputError(f"encoder {config.encoder} not found; set encoder=null to train on the cache of "
                         f"{cache.manifest['encoder']} without checking its weights")
    cache.validate(config.data, config.split, records, config.encoder)
    absent = [kind for kind in mix.kinds if kind not in cache.kinds]
    if absent:
        raise InputError(f"caption_mix draws {', '.join(absent)} captions but cache {config.cache} holds only "
                         f"{', '.join(cache.kinds)}; rebuild it with those kinds or set their weight to 0")
    if config.adapter.input_dim is not None and config.adapter.input_dim != cache.dim:
        raise InputError(f"adapter.input_dim is {config.adapter.input_dim} but cache {config.cache} holds "
                         f"{cache.dim}-dim embeddings (from {cache.manifest['encoder']})")
    return cache


def _baseline_tokenizer(config: Stage2Config, captions, mix: CaptionMix, out: Path, resuming: bool, save: bool):
    """The given tokenizer, the pretrained CLIP's, the one saved by the run being resumed, or a new BPE."""
    source = config.text.tokenizer or config.vision.pretrained
    if source is None and resuming and (out / "tokenizer").is_dir():
        source = out / "tokenizer"
    if source is not None:
        try:
            return AutoTokenizer.from_pretrained(source, model_max_length=config.text.max_length)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a tokenizer from {source}: {err}") from None
    texts = (text for caption_set in captions for kind in mix.kinds for text in caption_set.get(kind, ()))
    tokenizer = train_caption_tokenizer(texts, config.text.vocab_size, config.text.max_length)
    if save:
        with atomic_dir(out / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)
    return tokenizer


def _new_vision_config(vision: VisionSettings) -> CLIPVisionConfig:
    if vision.hidden_size % vision.num_heads:
        raise InputError(f"vision.hidden_size {vision.hidden_size} is not divisible by "
                         f"vision.num_heads {vision.num_heads}")
    return CLIPVisionConfig(image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.hidden_size,
                            num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                            intermediate_size=vision.intermediate_size)


def build_model(config: Stage2Config, text_dim: int | None,
                 tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedModel:
    """A fresh stage-2 model of `config.model_type`: LLM2CLIP on `text_dim`-wide cached embeddings, or CLIP.

    Its logit scale (and bias) start where `config.loss` says (`llm2clip.losses.STAGE2_LOSSES`).
    """
    vision = config.vision
    loss = stage2_loss(config.loss)
    if config.model_type == "llm2clip":
        sizes = {"text_embed_dim": text_dim, "adapter_hidden_dim": config.adapter.hidden_dim,
                 "adapter_depth": config.adapter.depth, "adapter_whitening": config.adapter.whiten,
                 "adapter_input_l2norm": config.adapter.input_l2norm,
                 "text_projection_bias": config.adapter.projection_bias,
                 "projection_dim": config.projection_dim, "loss": config.loss}
        if vision.pretrained is not None:
            model = LLM2CLIPModel.from_vision_pretrained(vision.pretrained, **sizes)
        else:
            model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=_new_vision_config(vision).to_dict(), **sizes))
    elif vision.pretrained is not None:
        kind = json.loads((vision.pretrained / "config.json").read_text()).get("model_type") \
            if (vision.pretrained / "config.json").is_file() else None
        if kind != "clip":
            raise InputError(f"the CLIP baseline continues a full CLIPModel checkpoint; {vision.pretrained} has "
                             f"model_type {kind!r}")
        model = CLIPModel.from_pretrained(vision.pretrained, dtype=torch.float32)
    else:
        text = config.text
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
            max_position_embeddings=text.max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        vision_config = _new_vision_config(vision)
        model = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                     projection_dim=config.projection_dim, logit_scale_init_value=loss.logit_scale_init))
    # CLIPModel lays out its vision side like LLM2CLIPModel (vision_model, visual_projection): one locking rule.
    LLM2CLIPModel.lock_vision_layers(model, config.unlocked_vision_groups)
    return model


def _image_processor(vision: VisionSettings, image_size: int) -> BaseImageProcessor:
    """The checkpoint's image processor, else CLIP's (resize the short side, centre crop, CLIP mean/std)."""
    if vision.pretrained is not None and (vision.pretrained / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(vision.pretrained)
    else:
        processor = clip_image_processor(image_size)
    crop = getattr(processor, "crop_size", None) or processor.size
    if (crop.get("height"), crop.get("width")) != (image_size, image_size):
        raise InputError(f"the image processor of {vision.pretrained} makes {crop.get('height')}x{crop.get('width')} "
                         f"images but the vision tower takes {image_size}x{image_size}")
    return processor


def _sum_over_ranks(trainer: Stage2Trainer) -> Counter[str]:
    counts = torch.tensor([trainer.read_skips[r] for r in SKIP_REASONS], device=trainer.args.device)
    counts = trainer.accelerator.reduce(counts, reduction="sum")
    return Counter({reason: int(n) for reason, n in zip(SKIP_REASONS, counts.tolist()) if n})


def _save_final(trainer: Stage2Trainer, final: Path, extras: list) -> None:
    """Every rank joins `save_model` (DeepSpeed gathers there); rank 0 adds `extras` and swaps the dir in."""
    partial = final.with_name(f".{final.name}.partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if trainer.is_world_process_zero():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs
        for extra in extras:
            extra.save_pretrained(partial)
        replace_dir(partial, final)


def _export_tower(model_type: str, final: Path, processor: BaseImageProcessor, out_dir: Path) -> None:
    """Export the vision tower from the saved model (complete even where training sharded the weights)."""
    if model_type == "llm2clip":
        shortest = processor.size.get("shortest_edge")
        export_vision_tower(LLM2CLIPModel.from_pretrained(final), out_dir, image_size=shortest)
        return
    clip = CLIPModel.from_pretrained(final)
    tower = CLIPVisionModel(clip.config.vision_config)
    tower.load_state_dict(clip.vision_model.state_dict())
    with atomic_dir(out_dir) as tmp:
        tower.save_pretrained(tmp)
        processor.save_pretrained(tmp)
