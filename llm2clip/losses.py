"""Contrastive losses that stay correct across ranks (after open_clip's loss.py).

Each rank scores its local rows against the features gathered from every rank (`local_loss`). The
gather keeps gradients (`gather_with_grad`), so with DDP's gradient averaging the update equals the
one of a single process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` from every rank in rank order, keeping the autograd graph."""
    _, world_size = world_info()
    if world_size == 1:
        return features
    return torch.cat(all_gather_with_grad(features.contiguous()), dim=0)


class CaptionContrastiveLoss(nn.Module):
    """Supervised SimCSE: each anchor's positive is its partner; every other gathered positive is a negative.

    `scale` multiplies cosine similarities (50 = temperature 0.02, llm2vec's default).
    """

    def __init__(self, scale: float = 50.0):
        super().__init__()
        self.scale = scale

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        rank, _ = world_info()
        all_positives = gather_features(positives)
        scores = F.normalize(anchors, dim=-1) @ F.normalize(all_positives, dim=-1).T * self.scale
        labels = torch.arange(anchors.shape[0], device=anchors.device) + rank * anchors.shape[0]
        return F.cross_entropy(scores, labels)
