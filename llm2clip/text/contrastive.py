"""Stage 1b: caption-contrastive training (supervised SimCSE, LLM2CLIP's caption contrastive step).

Two captions of the same image are a positive pair; the other positives in the global batch are
negatives. Plain-text sentences are mixed in as unsupervised SimCSE pairs (the same sentence twice,
made different by LoRA dropout; with `tune: full` only the model's own dropout, if any, tells them apart).
Training starts from the MNTP-merged model with a fresh LoRA (`tune: lora`, the paper's) or tunes every
weight of it (`tune: full`).

The pair mix (`pairs`) weighs three kinds of caption pair:
    short_long   an image's short caption with its long (dense) caption: the paper's pairs, the original
                 CC3M caption with its ShareCaptioner caption;
    short_short  two short captions of one image (COCO has five);
    long_long    two long captions of one image.
Kinds that no image of the data can form are dropped and the others' weights renormalised, so one
mix serves ShareGPT4V-style files (one short and one long caption per image: short_long only),
COCO-Karpathy (short only: short_short only) and the synthetic world (all three).

Each global batch holds one kind of pair (plain sentences are a kind of their own), so short captions
are not padded to paragraph length; anchors and positives are padded apart, so the short side of a
short_long pair is not padded to the long side's length either.

Outputs under `out_dir`:
    adapter/      the supervised LoRA adapter (llm2vec layout, loads on top of the MNTP-merged model); lora only
    merged/       everything merged: the caption encoder used by stage 2
    checkpoints/  Trainer checkpoints (the adapter, or the whole model with `tune: full`), used to resume
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer, set_seed

from llm2clip.config import config_to_dict
from llm2clip.data.records import ImageText, describe_counts, load_image_texts, read_corpus
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json
from llm2clip.losses import CaptionContrastiveLoss
from llm2clip.rerun import finished_run, total_runtime
from llm2clip.sampling import ItemKey, item_rng, train_dataloader
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.mntp import lora_config
from llm2clip.training import LoraSettings, TrainSettings, loss_curve, resume_checkpoint, training_arguments

PAIR_KINDS = ("short_long", "short_short", "long_long")  # caption pairs; plain sentences are the kind "plain"
PLAIN = "plain"


def default_pairs() -> dict[str, float]:
    # The paper pairs each image's short caption with its dense one; we add the world's other pairs at lower weight.
    return {"short_long": 0.5, "short_short": 0.25, "long_long": 0.25}


@dataclass
class ContrastiveConfig:
    model: Path = Path("runs/stage1/mntp/merged")
    data: Path = Path("runs/world")
    split: str = "train"
    pairs: dict[str, float] = field(default_factory=default_pairs)  # weights of the caption pair kinds
    corpus: Path | None = Path("runs/world/corpus.txt")  # plain text for unsupervised pairs; null for none
    plain_text_ratio: float = 0.1  # share of training pairs that are plain sentences
    plain_text_max_words: int = 40  # longer corpus lines would pad whole batches to paragraph length
    out_dir: Path = Path("runs/stage1/contrastive")
    pooling_mode: str = "mean"
    max_length: int = 160  # truncation of training captions; the saved encoder keeps the model's own
    scale: float = 50.0  # logit scale, 1 / temperature
    tune: str = "lora"  # lora (the paper's, on an 8B LLM) | full (every weight; only sensible for a small LLM)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(max_steps=300, batch_size=32, learning_rate=1e-3, save_steps=100)
    )


REPORT = "contrastive_report.json"


def long_partners(record: ImageText) -> list[str]:
    """The long captions a short caption can pair with: those that are not a short caption too (a one-sentence
    LLaVA caption is read as both)."""
    return [text for text in record.long_captions if text not in record.captions]


def can_form(kind: str, record: ImageText) -> bool:
    """Whether `record` has the captions for one pair of `kind`."""
    if kind == "short_long":
        return bool(long_partners(record))
    return len(record.captions if kind == "short_short" else record.long_captions) >= 2


def pair_counts(records: list[ImageText], weights: dict[str, float]) -> dict[str, int]:
    """Caption pairs of each kind per epoch: about one per image that can form a weighted kind, shared out by weight
    among the kinds some image can form. Refuses weights that are not a mix and data that forms no weighted kind."""
    unknown = sorted(set(weights) - set(PAIR_KINDS))
    if unknown:
        raise InputError(f"pairs: unknown pair kind {unknown[0]!r}; the kinds are {', '.join(PAIR_KINDS)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise InputError(f"pairs: weights must be >= 0 numbers and not all 0; got {weights}")
    formable = {kind: sum(can_form(kind, r) for r in records) for kind, w in weights.items() if w > 0}
    kept = {kind: weights[kind] for kind, images in formable.items() if images > 0}
    if not kept:
        raise InputError(f"no image has two captions of a kind the pair mix asks for ({weights}); "
                         "caption-contrastive training needs pairs")
    images = sum(any(can_form(kind, r) for kind in kept) for r in records)
    total = sum(kept.values())
    return {kind: max(1, round(images * weight / total)) for kind, weight in kept.items()}


class CaptionPairs(Dataset):
    """Item (epoch, i) is one pair of the kind `kinds[i]`, drawn from (seed, epoch, i).

    Caption pairs come first, kind by kind (`counts`); the images of a kind are walked in a fixed seeded order,
    each epoch going on where the last one stopped, so a kind with fewer pairs per epoch than images still
    sees them all. A short_long pair is (short, long); the others two different captions of one side.
    Past the caption pairs, one plain sentence twice.
    """

    def __init__(self, records: list[ImageText], counts: dict[str, int], sentences: list[str], seed: int):
        self.records, self.counts, self.sentences, self.seed = records, counts, sentences, seed
        self.images = {}  # kind -> indices of the records that can form it, in a seeded order
        for kind in counts:
            self.images[kind] = [i for i, r in enumerate(records) if can_form(kind, r)]
            random.Random(f"{seed}/{kind}").shuffle(self.images[kind])
        self.kinds = [kind for kind, count in counts.items() for _ in range(count)] + [PLAIN] * len(sentences)
        self.starts = {}  # kind -> its first item index
        for index, kind in reversed(list(enumerate(self.kinds))):
            self.starts[kind] = index

    def __len__(self) -> int:
        return len(self.kinds)

    def __getitem__(self, key: ItemKey) -> tuple[str, str]:
        epoch, index = key
        kind = self.kinds[index]
        if kind == PLAIN:
            sentence = self.sentences[index - self.starts[PLAIN]]
            return sentence, sentence
        images = self.images[kind]
        record = self.records[images[(epoch * self.counts[kind] + index - self.starts[kind]) % len(images)]]
        rng = item_rng(self.seed, epoch, index)
        if kind == "short_long":
            return rng.choice(record.captions), rng.choice(long_partners(record))
        first, second = rng.sample(record.captions if kind == "short_short" else record.long_captions, 2)
        return first, second


class SameKindBatches(Sampler[ItemKey]):
    """Item keys (epoch, index) in blocks of `block` that share a kind; blocks in a fresh random order each epoch.

    `block` is the global batch (per-device batch x ranks), so each rank's share of a step is one kind
    too. Items of a kind that do not fill a block are left out of that epoch (a different few each time);
    a kind with fewer items than one block is left out altogether, with a warning.
    """

    def __init__(self, kinds: list[str], block: int, seed: int):
        self.block, self.seed, self.epoch = block, seed, 0
        self.by_kind = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in dict.fromkeys(kinds)}
        too_few = {kind: len(items) for kind, items in self.by_kind.items() if len(items) < block}
        if len(too_few) == len(self.by_kind):
            raise InputError(f"every kind of pair has fewer pairs than one global batch of {block}: {too_few}; "
                             "lower the batch size or add data")
        if too_few:
            warnings.warn(f"left out of training, fewer pairs than one global batch of {block}: {too_few}", stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _blocks(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        blocks = []
        for items in self.by_kind.values():
            items = list(items)
            rng.shuffle(items)
            blocks += [items[start : start + self.block] for start in range(0, len(items) - self.block + 1, self.block)]
        rng.shuffle(blocks)
        return blocks

    def __iter__(self) -> Iterator[ItemKey]:
        return iter([(self.epoch, index) for block in self._blocks() for index in block])

    def __len__(self) -> int:
        return sum(len(items) // self.block * self.block for items in self.by_kind.values())


@dataclass
class PairCollator:
    """Tokenises anchors and positives into two left-padded batches, each padded to its own longest text."""

    encoder: LLMEncoder

    def __call__(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        anchors = self.encoder.tokenize(self.encoder.prepare_texts([first for first, _ in pairs]))
        positives = self.encoder.tokenize(self.encoder.prepare_texts([second for _, second in pairs]))
        return {**anchors, **{f"positive_{name}": value for name, value in positives.items()}}


class CaptionContrastiveTrainer(Trainer):
    """One step: embed anchors and positives with bidirectional attention, pool, score anchors against positives."""

    def __init__(self, *args, encoder: LLMEncoder, loss_fn: CaptionContrastiveLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.loss_fn = loss_fn

    def get_train_dataloader(self) -> DataLoader:
        block = self.args.per_device_train_batch_size * self.args.world_size
        return train_dataloader(self, SameKindBatches(self.train_dataset.kinds, block, seed=self.args.seed))

    def _embed(self, model, features: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                       is_causal=False).last_hidden_state
        return self.encoder.pool(hidden, features)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor_side = {name: value for name, value in inputs.items() if not name.startswith("positive_")}
        positive_side = {name.removeprefix("positive_"): value for name, value in inputs.items()
                         if name.startswith("positive_")}
        anchors, positives = self._embed(model, anchor_side), self._embed(model, positive_side)
        loss = self.loss_fn(anchors, positives)
        return (loss, {"embeddings": torch.cat([anchors, positives])}) if return_outputs else loss


def training_pairs(config: ContrastiveConfig, skipped: Counter[str] | None = None) -> CaptionPairs:
    """The training pairs of `config.data` (and corpus); the entries left out are added to `skipped` by reason."""
    records = load_image_texts(config.data, split=config.split, skipped=skipped)
    counts = pair_counts(records, config.pairs)
    sentences: list[str] = []
    if config.corpus is not None and config.plain_text_ratio > 0:
        if not 0 < config.plain_text_ratio < 1:
            raise InputError(f"plain_text_ratio must be in [0, 1); got {config.plain_text_ratio}")
        wanted = round(sum(counts.values()) * config.plain_text_ratio / (1 - config.plain_text_ratio))
        corpus = [line for line in read_corpus(config.corpus) if len(line.split()) <= config.plain_text_max_words]
        sentences = random.Random(config.train.seed).sample(corpus, min(wanted, len(corpus)))
    return CaptionPairs(records, counts, sentences, seed=config.train.seed)


TUNES = ("lora", "full")


def train_contrastive(config: ContrastiveConfig) -> dict:
    if config.tune not in TUNES:
        raise InputError(f"tune must be one of {', '.join(TUNES)}; got {config.tune!r}")
    out = Path(config.out_dir)
    outputs = [out / "adapter", out / "merged"] if config.tune == "lora" else [out / "merged"]
    finished = finished_run("stage1 contrastive", out, out / REPORT, outputs, config_to_dict(config))
    if finished is not None:
        return finished
    skipped: Counter[str] = Counter()
    pairs = training_pairs(config, skipped)
    left_out = describe_counts(skipped)
    mix = ", ".join(f"{kind} {count}" for kind, count in pairs.counts.items())
    print(f"caption contrastive: pairs per epoch {mix}, plain {len(pairs.sentences)}; "
          f"entries of {config.data} left out: {left_out}")
    encoder = LLMEncoder.from_pretrained(config.model, pooling_mode=config.pooling_mode)
    set_seed(config.train.seed)  # the LoRA's random initialisation
    saved_max_length, encoder.max_length = encoder.max_length, config.max_length  # truncation while training only
    if config.tune == "lora":
        encoder.model = get_peft_model(encoder.model, lora_config(config.lora))
        encoder.model.peft_config["default"].base_model_name_or_path = str(config.model.resolve())
        if config.train.gradient_checkpointing:
            encoder.model.enable_input_require_grads()
        encoder.model.print_trainable_parameters()
    else:
        print(f"trainable params: {sum(p.numel() for p in encoder.model.parameters()):,} (full fine-tuning)")

    checkpoint_dir = config.out_dir / "checkpoints"
    args = training_arguments(config.train, checkpoint_dir, remove_unused_columns=False, dataloader_drop_last=True)
    trainer = CaptionContrastiveTrainer(
        model=encoder.model,
        args=args,
        train_dataset=pairs,
        data_collator=PairCollator(encoder),
        encoder=encoder,
        loss_fn=CaptionContrastiveLoss(scale=config.scale),
    )
    resume_from = resume_checkpoint(config.train, checkpoint_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)

    encoder.max_length = saved_max_length
    if config.tune == "lora":
        encoder.save_pretrained(config.out_dir / "adapter", merge=False)
    encoder.save_pretrained(config.out_dir / "merged", merge=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "config": config_to_dict(config),
        "pairs": len(pairs),
        "caption_pairs": dict(pairs.counts),  # per epoch, by kind
        "plain_text_pairs": len(pairs.sentences),
        "skipped_entries": dict(skipped),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_curve": loss_curve(trainer.state.log_history),
        "train_runtime_s": total_runtime(result.metrics["train_runtime"], out / REPORT, resumed=resume_from is not None),
    }
    atomic_write_json(out / REPORT, report)
    print(f"caption contrastive: {report['steps']} steps, loss {report['first_loss']} -> {report['last_loss']}")
    print(f"wrote {' and '.join(str(path) for path in outputs)}")
    return report
