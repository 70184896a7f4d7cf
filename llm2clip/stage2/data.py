"""Stage-2 training data: the caption mix, map-style image-caption datasets and the batch collator.

A sample is one image and one caption drawn through the caption mix: first a kind (short, long or
translated) by its weight among the kinds the image has, then one caption of that kind. The caption
is a text (for the plain CLIP baseline, which tokenises it) or a row of the embedding cache (for
LLM2CLIP, whose text side reads frozen LLM embeddings). The draw for item i in epoch e derives from
(seed, e, i) alone (`llm2clip.sampling`), so workers and resumed runs draw the same captions.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import (
    BaseImageProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from llm2clip.data.records import ImageText, check_image
from llm2clip.embed.cache import KINDS, EmbeddingCache
from llm2clip.errors import InputError
from llm2clip.sampling import ItemKey, item_generator

Captions = dict[str, Sequence]  # kind -> caption texts or cache rows
START, END = "<|startoftext|>", "<|endoftext|>"


class CaptionMix:
    """Draws one caption per sample: a kind by weight among the kinds on offer, then a caption of it.

    Kinds with weight 0 are never drawn. An image lacking a kind draws among the kinds it has, with
    their weights renormalised.
    """

    def __init__(self, weights: dict[str, float]):
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise InputError(f"caption_mix has unknown kind(s) {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
        for kind, weight in weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise InputError(f"caption_mix.{kind} must be a number >= 0, got {weight!r}")
        self.weights = {kind: float(weights[kind]) for kind in KINDS if weights.get(kind, 0) > 0}
        if not self.weights:
            raise InputError(f"caption_mix gives no kind a positive weight: {weights}")

    @property
    def kinds(self) -> list[str]:
        return list(self.weights)

    def offered(self, captions: Captions) -> list[str]:
        """The mixed kinds of which `captions` holds at least one."""
        return [kind for kind in self.weights if len(captions.get(kind, ()))]

    def draw(self, captions: Captions, generator: torch.Generator | None = None) -> Any:
        """One caption (text or row) of `captions`, or None when it has none of the mixed kinds."""
        kinds = self.offered(captions)
        if not kinds:
            return None
        weights = torch.tensor([self.weights[kind] for kind in kinds])
        kind = kinds[int(torch.multinomial(weights, 1, generator=generator))]
        options = captions[kind]
        return options[int(torch.randint(len(options), (), generator=generator))]


class RecordTexts:
    """Captions of record i as texts, by kind."""

    def __init__(self, records: Sequence[ImageText]):
        self.records = records

    def __call__(self, index: int) -> Captions:
        record = self.records[index]
        return {"short": record.captions, "long": record.long_captions, "translated": record.translated}


class CacheRows:
    """Captions of image i as embedding-cache row ids, by kind."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache

    def __call__(self, index: int) -> Captions:
        return {kind: self.cache.rows(index, kind) for kind in self.cache.kinds}


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageCaptionDataset(Dataset):
    """Item (epoch, i): the image at `paths[i]` with one caption of dataset image `indices[i]`, drawn through
    the mix from (seed, epoch, i)."""

    def __init__(self, paths: list[Path], indices: list[int], captions: Callable[[int], Captions], mix: CaptionMix,
                 seed: int = 0):
        self.paths = paths
        self.indices = indices
        self.captions = captions  # image index -> Captions
        self.mix = mix
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        epoch, i = key
        caption = self.mix.draw(self.captions(self.indices[i]), item_generator(self.seed, epoch, i))
        return {"image": load_rgb(self.paths[i]), "caption": caption}


def image_caption_dataset(
    records: Sequence[ImageText], captions: Callable[[int], Captions], mix: CaptionMix, seed: int = 0
) -> tuple[ImageCaptionDataset, Counter[str], dict[str, str]]:
    """The usable records as a dataset, the skip counts by reason and one example message per reason.

    A record is skipped when it has no caption of the mixed kinds, or when its image is missing or
    does not decode (every image is opened once here, in threads).
    """
    skips: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def skip(reason: str, message: str) -> None:
        skips[reason] += 1
        examples.setdefault(reason, message)

    with_captions = []
    for index, record in enumerate(records):
        if mix.offered(captions(index)):
            with_captions.append(index)
        else:
            skip("no caption of the caption_mix kinds", f"{record.image} has no {' / '.join(mix.kinds)} caption")
    paths = [records[index].image for index in with_captions]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        problems = list(tqdm(pool.map(check_image, paths, chunksize=64), total=len(paths), desc="check images",
                             unit="img", leave=False, disable=None))
    kept_paths, kept = [], []
    for index, path, problem in zip(with_captions, paths, problems):
        if problem is None:
            kept_paths.append(path)
            kept.append(index)
        else:
            skip("missing image" if problem.startswith("missing") else "corrupt image", problem)
    if not kept:
        raise InputError(f"no usable image-caption pairs: {dict(skips)}; e.g. {next(iter(examples.values()))}")
    return ImageCaptionDataset(kept_paths, kept, captions, mix, seed), skips, examples


@dataclass
class ImageCaptionCollator:
    """Preprocesses a batch of images at once, and embeds (cache rows) or tokenises (texts) its captions.

    Samples read from tar shards may carry the counts of samples skipped before them; they are summed
    into the batch under "skipped" for the trainer to tally.
    """

    processor: BaseImageProcessor
    cache: EmbeddingCache | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    max_length: int = 77

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "pixel_values": self.processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
        }
        captions = [s["caption"] for s in samples]
        if self.cache is not None:
            batch["llm_embeddings"] = torch.from_numpy(self.cache.embeddings(captions))
        else:
            tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        skipped = sum((Counter(s.get("skipped", {})) for s in samples), Counter())
        if skipped:
            batch["skipped"] = dict(skipped)
        return batch


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, shaped like CLIP's: every text becomes
    `<|startoftext|> ... <|endoftext|>` (truncation keeps both), and padding repeats `<|endoftext|>`.

    `<|endoftext|>` gets id 0: CLIPTextTransformer pools at the first end token, except for end id 2,
    which it reads as a legacy checkpoint and pools at the highest token id instead.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END, START],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}",
        special_tokens=[(START, backend.token_to_id(START)), (END, backend.token_to_id(END))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=START, eos_token=END, pad_token=END,
                                   model_max_length=max_length, clean_up_tokenization_spaces=False)
