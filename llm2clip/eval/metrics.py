"""Retrieval recall and zero-shot accuracy from score matrices.

Counting follows CLIP_benchmark: with several captions per image, a text query is a hit when its
own image is in the top k, and an image query is a hit when ANY of its captions is. Ties are broken
at random, and a query scores its chance of being a hit (as CRA shares ties), so a model whose
features are all equal scores chance level, not a lucky 100%. With k at or above the number of
candidates every query is a hit.
"""

from __future__ import annotations

import torch

TIE_ATOL = 1e-6  # scores this close count as tied (cosine similarities in float32)


def hit_rate(scores: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """Chance per query that a positive candidate lands in the top k under random tie-breaking.

    `scores` and `positive` are [queries, candidates]; every query needs at least one positive.
    Candidates tied with the best positive fill the slots left after the ones scored above it; the
    chance that all those slots go to negatives is a ratio of binomial coefficients.
    """
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} must share a 2-D shape")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not positive.any(dim=1).all():
        raise ValueError("every query needs at least one positive candidate")
    scores = scores.double()
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    above = (scores > best + TIE_ATOL).sum(dim=1)
    tied = (scores - best).abs() <= TIE_ATOL
    n_pos = (tied & positive).sum(dim=1)
    n_neg = (tied & ~positive).sum(dim=1)
    slots = (k - above).clamp(min=0)
    all_missed = torch.ones(scores.shape[0], dtype=torch.float64)
    for i in range(k):  # P(the first `slots` tied draws are all negatives), one draw at a time
        draw_missed = (n_neg - i).clamp(min=0) / (n_pos + n_neg - i).clamp(min=1)
        all_missed = all_missed * torch.where(i < slots, draw_missed, 1.0)
    return 1.0 - all_missed


def retrieval_recall(
    scores: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image recall@k.

    `scores` is [images, texts] (cosine similarities); `text_image[j]` is the image of text j, and
    every image needs at least one text.
    """
    n_images, n_texts = scores.shape
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must have one entry per text ({n_texts}), got shape {tuple(text_image.shape)}")
    if text_image.min() < 0 or text_image.max() >= n_images:
        raise ValueError(f"text_image holds image indices outside 0..{n_images - 1}")
    positive = text_image.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # [images, texts]
    metrics = {}
    for k in ks:
        metrics[f"i2t R@{k}"] = float(hit_rate(scores, positive, k).mean())
    for k in ks:
        metrics[f"t2i R@{k}"] = float(hit_rate(scores.T, positive.T, k).mean())
    return metrics


def zeroshot_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of [images, classes] logits against integer `labels`."""
    n_images, n_classes = logits.shape
    if labels.shape != (n_images,):
        raise ValueError(f"labels must have one entry per image ({n_images}), got shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels outside 0..{n_classes - 1}")
    positive = labels.unsqueeze(1) == torch.arange(n_classes).unsqueeze(0)
    return {f"top-{k}": float(hit_rate(logits, positive, k).mean()) for k in ks}
