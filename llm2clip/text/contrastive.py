"""Stage 1b: caption-contrastive LoRA training (supervised SimCSE, LLM2CLIP's caption contrastive step).

Two captions of the same image are a positive pair; the other positives in the global batch are
negatives. Plain-text sentences are mixed in as unsupervised SimCSE pairs (the same sentence twice,
made different by LoRA dropout). Training starts from the MNTP-merged model with a fresh LoRA.

With `include_long_captions`, an image with two or more long captions also gives a pair of two of
them. A short caption is never paired with a long one: it names a part of the scene, so matching
the two would teach the encoder to drop the rest of the long caption. Each global batch holds one
kind of pair (short, or long), so long captions are contrasted with long ones and short batches
are not padded to paragraph length.

Outputs under `out_dir`:
    adapter/      the supervised LoRA adapter (llm2vec layout, loads on top of the MNTP-merged model)
    merged/       everything merged: the caption encoder used by stage 2
    checkpoints/  Trainer checkpoints (adapter only), used to resume
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
from llm2clip.data.records import load_image_texts, read_corpus
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json
from llm2clip.losses import CaptionContrastiveLoss
from llm2clip.rerun import finished_run, total_runtime
from llm2clip.sampling import ItemKey, item_rng, train_dataloader
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.mntp import lora_config
from llm2clip.training import LoraSettings, TrainSettings, resume_checkpoint, training_arguments


@dataclass
class ContrastiveConfig:
    model: Path = Path("runs/stage1/mntp/merged")
    data: Path = Path("runs/world")
    split: str = "train"
    corpus: Path | None = Path("runs/world/corpus.txt")  # plain text for unsupervised pairs; null for none
    plain_text_ratio: float = 0.1  # share of training pairs that are plain sentences
    plain_text_max_words: int = 40  # longer corpus lines would pad whole batches to paragraph length
    include_long_captions: bool = False  # also pair two long captions of an image (never a short with a long)
    out_dir: Path = Path("runs/stage1/contrastive")
    pooling_mode: str = "mean"
    max_length: int = 160  # truncation of training captions; the saved encoder keeps the model's own
    scale: float = 50.0  # logit scale, 1 / temperature
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(max_steps=300, batch_size=32, learning_rate=1e-3, save_steps=100)
    )


REPORT = "contrastive_report.json"
SHORT, LONG = 0, 1  # pair kinds
KIND_NAMES = {SHORT: "short (and plain-text) pairs", LONG: "long-caption pairs"}


class CaptionPairs(Dataset):
    """Item (epoch, i) is two different captions of caption group i (an image's short captions, or its long
    ones), drawn from (seed, epoch, i); past the groups, one plain sentence twice. `kinds[i]` says which
    kind of pair item i is."""

    def __init__(self, caption_groups: list[list[str]], sentences: list[str], seed: int,
                 group_kinds: list[int] | None = None):
        group_kinds = group_kinds if group_kinds is not None else [SHORT] * len(caption_groups)
        kept = [(group, kind) for group, kind in zip(caption_groups, group_kinds, strict=True) if len(group) >= 2]
        if not kept:
            raise InputError("no image has two captions; caption-contrastive training needs pairs")
        self.groups = [group for group, _ in kept]
        self.sentences = sentences
        self.kinds = [kind for _, kind in kept] + [SHORT] * len(sentences)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.groups) + len(self.sentences)

    def __getitem__(self, key: ItemKey) -> tuple[str, str]:
        epoch, index = key
        if index < len(self.groups):
            first, second = item_rng(self.seed, epoch, index).sample(self.groups[index], 2)
            return first, second
        sentence = self.sentences[index - len(self.groups)]
        return sentence, sentence


class SameKindBatches(Sampler[ItemKey]):
    """Item keys (epoch, index) in blocks of `block` that share a kind; blocks in a fresh random order each epoch.

    `block` is the global batch (per-device batch x ranks), so each rank's share of a step is one kind
    too. Items of a kind that do not fill a block are left out of that epoch (a different few each time);
    a kind with fewer items than one block is left out altogether, with a warning.
    """

    def __init__(self, kinds: list[int], block: int, seed: int):
        self.block, self.seed, self.epoch = block, seed, 0
        self.by_kind = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in sorted(set(kinds))}
        too_few = {KIND_NAMES[k]: len(items) for k, items in self.by_kind.items() if len(items) < block}
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
    """Tokenises anchors then positives into one left-padded batch of 2B rows."""

    encoder: LLMEncoder

    def __call__(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts = [first for first, _ in pairs] + [second for _, second in pairs]
        return dict(self.encoder.tokenize(self.encoder.prepare_texts(texts)))


class CaptionContrastiveTrainer(Trainer):
    """One step: embed the 2B rows with bidirectional attention, pool, score anchors against positives."""

    def __init__(self, *args, encoder: LLMEncoder, loss_fn: CaptionContrastiveLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.loss_fn = loss_fn

    def get_train_dataloader(self) -> DataLoader:
        block = self.args.per_device_train_batch_size * self.args.world_size
        return train_dataloader(self, SameKindBatches(self.train_dataset.kinds, block, seed=self.args.seed))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], is_causal=False
        ).last_hidden_state
        embeddings = self.encoder.pool(hidden, inputs)
        anchors, positives = embeddings.chunk(2)
        loss = self.loss_fn(anchors, positives)
        return (loss, {"embeddings": embeddings}) if return_outputs else loss


def training_pairs(config: ContrastiveConfig, skipped: Counter[str] | None = None) -> CaptionPairs:
    """The caption pairs of `config.data`; the entries left out are added to `skipped` by reason."""
    records = load_image_texts(config.data, split=config.split, skipped=skipped)
    groups = [r.captions for r in records]
    kinds = [SHORT] * len(groups)
    if config.include_long_captions:
        groups += [r.long_captions for r in records]
        kinds += [LONG] * len(records)
    sentences: list[str] = []
    if config.corpus is not None and config.plain_text_ratio > 0:
        if not 0 < config.plain_text_ratio < 1:
            raise InputError(f"plain_text_ratio must be in [0, 1); got {config.plain_text_ratio}")
        wanted = round(len(groups) * config.plain_text_ratio / (1 - config.plain_text_ratio))
        corpus = [line for line in read_corpus(config.corpus) if len(line.split()) <= config.plain_text_max_words]
        sentences = random.Random(config.train.seed).sample(corpus, min(wanted, len(corpus)))
    return CaptionPairs(groups, sentences, seed=config.train.seed, group_kinds=kinds)


def train_contrastive(config: ContrastiveConfig) -> dict:
    out = Path(config.out_dir)
    finished = finished_run("stage1 contrastive", out, out / REPORT, [out / "adapter", out / "merged"],
                            config_to_dict(config))
    if finished is not None:
        return finished
    skipped: Counter[str] = Counter()
    pairs = training_pairs(config, skipped)
    left_out = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"
    print(f"caption contrastive: {len(pairs.groups)} caption groups; entries of {config.data} left out: {left_out}")
    encoder = LLMEncoder.from_pretrained(config.model, pooling_mode=config.pooling_mode)
    set_seed(config.train.seed)  # the LoRA's random initialisation
    saved_max_length, encoder.max_length = encoder.max_length, config.max_length  # truncation while training only
    encoder.model = get_peft_model(encoder.model, lora_config(config.lora))
    encoder.model.peft_config["default"].base_model_name_or_path = str(config.model.resolve())
    if config.train.gradient_checkpointing:
        encoder.model.enable_input_require_grads()
    encoder.model.print_trainable_parameters()

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
    encoder.save_pretrained(config.out_dir / "adapter", merge=False)
    encoder.save_pretrained(config.out_dir / "merged", merge=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "config": config_to_dict(config),
        "pairs": len(pairs),
        "caption_pairs": len(pairs.groups),
        "long_caption_pairs": pairs.kinds.count(LONG),
        "plain_text_pairs": len(pairs.sentences),
        "skipped_entries": dict(skipped),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_runtime_s": total_runtime(result.metrics["train_runtime"], out / REPORT, resumed=resume_from is not None),
    }
    atomic_write_json(out / REPORT, report)
    print(f"caption contrastive: {report['steps']} steps, loss {report['first_loss']} -> {report['last_loss']}")
    print(f"wrote {config.out_dir / 'adapter'} and {config.out_dir / 'merged'}")
    return report
