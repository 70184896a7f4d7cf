"""Retrieval examples: for a few test images, each tower's top long captions among the test set's long captions."""

from __future__ import annotations

import torch
from PIL import Image

from llm2clip.data.records import load_image_texts
from llm2clip.demo.steps import TOWERS, Paths
from llm2clip.eval.towers import load_tower

TOP_K = 3


def retrieval_examples(paths: Paths, n_images: int, gallery_images: int | None) -> list[dict]:
    """Per image: its path, one of its long captions and, per tower, the top captions (each marked right or not).

    The gallery is the long captions of the first `gallery_images` test images (the evaluation's set).
    """
    records = [r for r in load_image_texts(paths.world, "test")[:gallery_images] if r.long_captions]
    captions = [caption for r in records for caption in r.long_captions]
    owner = [i for i, r in enumerate(records) for _ in r.long_captions]
    shown = records[:n_images]
    images = []
    for record in shown:
        with Image.open(record.image) as image:
            images.append(image.convert("RGB"))
    examples = [{"image": str(r.image), "caption": r.long_captions[0], "top": {}} for r in shown]
    for tower_name in TOWERS:
        tower = load_tower(paths.stage2(tower_name) / "final", device="cpu")
        with torch.no_grad():
            scores = tower.image_features(images) @ tower.text_features(captions).T
        for row, example in enumerate(examples):
            best = scores[row].topk(min(TOP_K, len(captions))).indices.tolist()
            example["top"][tower_name] = [{"caption": captions[j], "correct": owner[j] == row} for j in best]
    return examples
