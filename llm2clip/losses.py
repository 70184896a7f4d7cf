"""Contrastive losses that stay correct across ranks (after open_clip's loss.py).

Each rank scores its local rows against the features gathered from every rank (`local_loss`). The
gather keeps gradients (`gather_with_grad`), so with DDP's gradient averaging the update equals the
one of a single process on the concatenated batch. Stage 1 uses `CaptionContrastiveLoss`; stage 2
uses `ClipLoss` (InfoNCE) or `SigLipLoss` (sigmoid), picked by name from `STAGE2_LOSSES` with the
logit scale and bias each one starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from llm2clip.errors import InputError


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate `features` from every rank in rank order.

    With `with_grad` the gather is differentiable: gradients flow back to the rank that made each row.
    Without it, only this rank's own rows keep their graph and the others are constants.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return features
    if with_grad:
        return torch.cat(all_gather_with_grad(features.contiguous()), dim=0)
    parts = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.detach().contiguous())
    parts[rank] = features
    return torch.cat(parts, dim=0)


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


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the global batch (image i matches text i).

    Inputs are L2-normalised features and the logit scale already exponentiated; a logit bias is
    accepted for an interface shared with `SigLipLoss`, but a bias shared by all logits cancels in the
    softmax. Every rank must hold the same local batch size.
    `local_loss`: each rank scores its own images against every rank's texts and its own texts against
    every rank's images (memory linear in world size); otherwise each rank builds the full matrix.
    `gather_with_grad`: gradients flow through the gather, so with DDP's averaging the update equals a
    single process on the concatenated batch, whichever `local_loss`. Without it, other ranks'
    features are constants: cheaper, but the gradient is only an approximation.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, _ = world_info()
        all_images = gather_features(image_features, self.gather_with_grad)
        all_texts = gather_features(text_features, self.gather_with_grad)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
            offset = rank * image_features.shape[0]
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T
            logits_per_text = logits_per_image.T
            offset = 0
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss: each (image, text) pair is its own match / no-match problem.

    Inputs are L2-normalised features, the logit scale already exponentiated and an optional bias.
    Each rank scores its own images against every rank's texts (gathered with gradients) and divides
    the summed loss by its local batch size, so DDP's average equals the single-process loss on the
    concatenated batch. (open_clip passes texts around a ring instead; the values are the same.)
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, _ = world_info()
        all_texts = gather_features(text_features)
        logits = logit_scale * image_features @ all_texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        batch = image_features.shape[0]
        rows = torch.arange(batch, device=logits.device) + rank * batch
        columns = torch.arange(all_texts.shape[0], device=logits.device)
        labels = 2.0 * (columns[None, :] == rows[:, None]).to(logits.dtype) - 1.0  # +1 matches, -1 elsewhere
        return -F.logsigmoid(labels * logits).sum() / batch


@dataclass(frozen=True)
class Stage2Loss:
    """A stage-2 loss and its learnable logits: the initial log scale and bias, and the clamp on the log scale."""

    module: type[nn.Module]
    logit_scale_init: float  # log of the initial scale
    logit_scale_max: float  # the log scale stays in [0, logit_scale_max]
    logit_bias_init: float | None  # None: the loss has no bias


STAGE2_LOSSES = {
    "clip": Stage2Loss(ClipLoss, logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100),
                       logit_bias_init=None),
    "siglip": Stage2Loss(SigLipLoss, logit_scale_init=math.log(10), logit_scale_max=math.log(100),
                         logit_bias_init=-10.0),  # the SigLIP paper's t = 10, b = -10
}


def stage2_loss(name: str) -> Stage2Loss:
    """The stage-2 loss called `name` ("clip" or "siglip")."""
    if name not in STAGE2_LOSSES:
        raise InputError(f"unknown loss {name!r}; use one of {', '.join(STAGE2_LOSSES)}")
    return STAGE2_LOSSES[name]
