"""Caption retrieval accuracy (CRA), LLM2CLIP's measure of how well a text model tells captions apart.

For each image take two of its captions, A and B. CRA is the share of A captions whose nearest
neighbour (cosine) among all B captions is their own partner. Ties count fractionally, so a model
that cannot separate two captions scores chance between them, not a lucky win.
A bag-of-words baseline is reported next to each model: the trivial solution to beat.

The translated kinds score an English caption against its own French rendering (`captions_fr`,
`long_caption_fr` in JSONL and world files): whether the encoder carries meaning across languages.
Two languages share few words, so the bag of words sits near chance there.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from llm2clip.data.records import load_image_texts
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json


@dataclass
class CRAConfig:
    model: list[str] | None = None  # one or more encoder directories (comma-separated on the command line)
    data: Path = Path("runs/world")
    split: str = "test"
    kind: str = "short"  # short | long: two captions of each image; translated | translated_long: one and its French;
    # several, comma-separated (short,long,translated): one run loads each encoder once, out names "{kind}"
    caption_a: int = 0  # which caption of each image is A (translated kinds: the English one, B its rendering)
    caption_b: int = 1  # and which is B (short and long kinds)
    max_images: int | None = None
    pooling_mode: str | None = None  # default: the encoder's own (llm2vec_config.json) or mean
    max_length: int | None = None
    batch_size: int = 64
    out: Path | None = None  # JSON report


def caption_retrieval_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows of `a` whose most similar row of `b` is the same index (ties shared)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    similarity = F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T
    best = similarity.max(dim=1, keepdim=True).values
    tied = (similarity >= best - 1e-9).double()
    return float((tied.diagonal() / tied.sum(dim=1)).mean())


def bag_of_words(texts: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """Word-count vectors over `vocabulary` (lower-cased words)."""
    vectors = torch.zeros(len(texts), len(vocabulary))
    for row, text in enumerate(texts):
        for word, count in Counter(re.findall(r"\w+", text.lower())).items():
            vectors[row, vocabulary[word]] = count
    return vectors


def bag_of_words_cra(a_texts: list[str], b_texts: list[str]) -> float:
    words = sorted({w for text in a_texts + b_texts for w in re.findall(r"\w+", text.lower())})
    vocabulary = {word: i for i, word in enumerate(words)}
    return caption_retrieval_accuracy(bag_of_words(a_texts, vocabulary), bag_of_words(b_texts, vocabulary))


KINDS = ("short", "long", "translated", "translated_long")


def caption_pairs(config: CRAConfig) -> tuple[list[str], list[str]]:
    if config.kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}; got {config.kind!r}")
    records = load_image_texts(config.data, split=config.split)
    if config.kind.startswith("translated"):
        side_a = [r.captions if config.kind == "translated" else r.long_captions for r in records]
        side_b = [r.captions_fr if config.kind == "translated" else r.long_captions_fr for r in records]
        indices = (config.caption_a, config.caption_a)
        french_key = "captions_fr" if config.kind == "translated" else "long_caption_fr"
        wanted = f"caption {config.caption_a} with its French rendering ({french_key})"
    else:
        side_a = side_b = [r.captions if config.kind == "short" else r.long_captions for r in records]
        indices = (config.caption_a, config.caption_b)
        wanted = f"{max(indices) + 1} {config.kind} captions"
    a, b = indices
    usable = [(texts_a, texts_b) for texts_a, texts_b in zip(side_a, side_b) if a < len(texts_a) and b < len(texts_b)]
    usable = usable[: config.max_images]
    if not usable:
        raise InputError(f"no image in {config.data} ({config.split}) has {wanted}")
    return [texts_a[a] for texts_a, _ in usable], [texts_b[b] for _, texts_b in usable]


def model_cra(model_dir: str, pairs: dict[str, tuple[list[str], list[str]]], config: CRAConfig) -> dict[str, float]:
    """CRA of one encoder on each kind's caption pairs, the encoder loaded once."""
    from llm2clip.text.encoder import LLMEncoder

    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode=config.pooling_mode, max_length=config.max_length)
    scores = {}
    for kind, (a_texts, b_texts) in pairs.items():
        embeddings = encoder.encode(a_texts + b_texts, batch_size=config.batch_size)
        scores[kind] = caption_retrieval_accuracy(embeddings[: len(a_texts)], embeddings[len(a_texts) :])
    return scores


def report_cra(config: CRAConfig) -> dict:
    """The CRA report of `config.kind`; with several kinds, {kind: report}, each written to out with {kind} filled."""
    kinds = [kind.strip() for kind in config.kind.split(",")]
    if len(kinds) > 1 and config.out is not None and "{kind}" not in str(config.out):
        raise InputError(f"cra: {len(kinds)} kinds ({config.kind}) need an out path with {{kind}} in it; got {config.out}")
    pairs = {kind: caption_pairs(replace(config, kind=kind)) for kind in kinds}
    scores = {kind: {"bag of words": bag_of_words_cra(*pairs[kind])} for kind in kinds}
    for model_dir in config.model or []:
        for kind, score in model_cra(model_dir, pairs, config).items():
            scores[kind][model_dir] = score
    reports = {}
    for kind in kinds:
        images = len(pairs[kind][0])
        rows = scores[kind]
        reports[kind] = {"data": str(config.data), "split": config.split, "kind": kind, "images": images,
                         "chance": 1 / images, "cra": rows}
        width = max(len(name) for name in rows)
        print(f"CRA ({kind.replace('_', ' ')} captions) on {images} {config.split} images (chance {100 / images:.2f}%)")
        for name, value in rows.items():
            print(f"  {name:<{width}}  {100 * value:6.2f}%")
        if config.out is not None:
            atomic_write_json(Path(str(config.out).replace("{kind}", kind)), reports[kind])
    return reports[kinds[0]] if len(kinds) == 1 else reports
