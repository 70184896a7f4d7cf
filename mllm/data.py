"""LLaVA's JSON data: reading and checking it, labelled token sequences, image batches in LLaVA's order.

Both of LLaVA's files are a JSON list of entries, with image paths relative to an image folder:
    pretraining (blip_laion_cc_sbu_558k.json): {"id", "image", "conversations": [
        {"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": caption}]}
    instruction tuning (llava_v1_5_mix665k.json): the same with several human/gpt turns; text-only
        entries have no "image" key and no <image> placeholder.
A malformed entry stops the run with an InputError that names it; an entry whose image file is
missing is skipped and counted; a sample longer than model_max_length is truncated and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler
from transformers import LlavaProcessor

from llm2clip.data.records import describe_counts
from llm2clip.errors import InputError
from mllm.builder import IMAGE_TOKEN, image_token_count
from mllm.templates import render

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Sample:
    id: str
    image: Path | None
    messages: list[dict[str, str]]  # user/assistant turns; <image> leads its turn, as LLaVA puts it
    length: int  # words in the conversation: LLaVA's length estimate for grouping batches


def read_llava_json(path: Path, image_folder: Path, max_samples: int | None = None) -> tuple[list[Sample], Counter]:
    """The usable samples among the first `max_samples` entries, and the count of skipped ones by reason."""
    path, image_folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise InputError(f"LLaVA data file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise InputError(f"{path} must hold a JSON list of samples, not a {type(entries).__name__}")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be at least 1, got {max_samples}")
    samples, skipped = [], Counter()
    for index, entry in enumerate(entries[:max_samples]):
        sample = _sample(entry, f"{path}: sample {index}", image_folder)
        if sample.image is not None and not sample.image.is_file():
            skipped["missing image"] += 1
        else:
            samples.append(sample)
    if not samples:
        raise InputError(f"{path}: no usable samples ({describe_counts(skipped)} skipped)")
    return samples, skipped


def _sample(entry: object, where: str, image_folder: Path) -> Sample:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise InputError(f"{where} is not an object with a 'conversations' list")
    where = f"{where} (id {entry['id']!r})" if "id" in entry else where
    turns = entry["conversations"]
    if not turns:
        raise InputError(f"{where} has an empty conversation")
    messages, placeholders = [], 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise InputError(f"{where}: turn {i} needs 'from' (human or gpt) and a string 'value', got {turn!r}")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            problem = "starts with gpt" if i == 0 else f"has two {turn['from']} turns in a row (turn {i})"
            raise InputError(f"{where}: the conversation {problem}; it must alternate human, gpt, human, ...")
        value, count = turn["value"], turn["value"].count(IMAGE_TOKEN)
        if count and turn["from"] == "gpt":
            raise InputError(f"{where}: turn {i} (gpt) holds an {IMAGE_TOKEN} placeholder")
        if count:
            value = f"{IMAGE_TOKEN}\n" + value.replace(IMAGE_TOKEN, "").strip()
        placeholders += count
        messages.append({"role": ROLES[turn["from"]], "content": value})
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: the conversation ends with a human turn, which has no answer to learn")
    image = entry.get("image")
    if image is None and placeholders:
        raise InputError(f"{where} holds an {IMAGE_TOKEN} placeholder but no image")
    if image is not None:
        if not isinstance(image, str):
            raise InputError(f"{where}: 'image' must be one path (LLaVA-1.5 takes one image), got {image!r}")
        if placeholders != 1:
            problem = "no" if placeholders == 0 else f"{placeholders}"
            raise InputError(f"{where} has an image and {problem} {IMAGE_TOKEN} placeholders; it needs exactly one")
    length = sum(len(turn["value"].split()) for turn in turns)
    return Sample(str(entry.get("id", where)), image_folder / image if image else None, messages, length)


class LlavaDataset(Dataset):
    """Samples rendered with a chat template: input_ids, labels that are -100 outside the assistant turns,
    pixel_values for samples with an image, and whether the sample was cut at `max_length` tokens."""

    def __init__(self, samples: list[Sample], processor: LlavaProcessor, chat_template: str, max_length: int):
        self.samples = samples
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_tokens = image_token_count(processor)
        if max_length <= self.image_tokens:
            raise InputError(f"model_max_length {max_length} leaves no room for text after the image's "
                             f"{self.image_tokens} tokens")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [sample.length for sample in self.samples]

    @property
    def has_image(self) -> list[bool]:
        return [sample.image is not None for sample in self.samples]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        input_ids, labels = self.tokenize(sample.messages)
        truncated = len(input_ids) > self.max_length
        if truncated:
            if self.image_id in input_ids[self.max_length:]:
                raise InputError(f"sample {sample.id}: its image ends past model_max_length {self.max_length}")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "truncated": truncated}
        if sample.image is not None:
            try:
                with Image.open(sample.image) as image:
                    item["pixel_values"] = self.processor.image_processor(
                        image.convert("RGB"), return_tensors="pt").pixel_values[0]
            except OSError as err:
                raise InputError(f"sample {sample.id}: cannot read image {sample.image}: {err}") from None
        return item

    def tokenize(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids with each `<image>` expanded as the processor does, and their labels."""
        rendered = render(self.chat_template, self.tokenizer, messages)
        bos = self.tokenizer.bos_token
        # The tokenizer adds its special tokens (BOS) unless the template wrote them itself. verbose=False: a
        # sample longer than the model is truncated and counted by __getitem__, not an "indexing error".
        encoding = self.tokenizer(rendered.text, return_offsets_mapping=True, verbose=False,
                                  add_special_tokens=not (bos and rendered.text.startswith(bos)))
        input_ids, labels = [], []
        for token, (start, end) in zip(encoding.input_ids, encoding.offset_mapping, strict=True):
            learned = end > start and any(a <= start and end <= b for a, b in rendered.targets)
            repeat = self.image_tokens if token == self.image_id else 1
            input_ids += [token] * repeat
            labels += [token if learned else IGNORE_INDEX] * repeat
        return input_ids, labels


@dataclass
class LlavaCollator:
    """Right-pads a batch; pixel_values stack the images of the samples that have one, in order."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        input_ids = [item["input_ids"] for item in items]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "labels": pad_sequence([item["labels"] for item in items], batch_first=True, padding_value=IGNORE_INDEX),
            "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
            "truncated": sum(item["truncated"] for item in items),
        }
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


class ModalityLengthGroupedSampler(Sampler[int]):
    """LLaVA's order for `group_by_modality_length`.

    Image and text-only samples never share a batch, except in one mixed group at the end. Each group
    of `batch_size * batches_per_group` samples (one optimizer step across ranks and accumulation
    steps) holds samples of similar length, dealt out so that every batch gets long and short ones.
    The DataLoader cuts the order into batches of `batch_size`.
    """

    def __init__(self, lengths: list[int], has_image: list[bool], batch_size: int, batches_per_group: int,
                 seed: int = 0):
        self.lengths = lengths
        self.has_image = has_image
        self.batch_size = batch_size
        self.batches_per_group = batches_per_group
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.batch_size * self.batches_per_group
        groups, rest = [], []
        for modality in (True, False):
            indices = [i for i, has in enumerate(self.has_image) if has is modality]
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            whole = len(order) - len(order) % size
            groups += [self._deal(order[start:start + size]) for start in range(0, whole, size)]
            rest += order[whole:]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        if rest:
            groups.append(self._deal(rest))
        return iter([index for group in groups for index in group])

    def _deal(self, group: list[int]) -> list[int]:
        """The group longest first, dealt round-robin into its batches, batch after batch."""
        ranked = sorted(group, key=lambda i: -self.lengths[i])
        batches = max(1, len(ranked) // self.batch_size)
        return [index for b in range(batches) for index in ranked[b::batches]]
