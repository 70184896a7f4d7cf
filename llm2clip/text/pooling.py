"""Pooling of left-padded hidden states into one vector per text (llm2vec's five modes, vectorised)."""

from __future__ import annotations

import torch
from torch import Tensor

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def pool(hidden: Tensor, mask: Tensor, mode: str, bos_mask: Tensor | None = None) -> Tensor:
    """[B, L, D] hidden states -> [B, D] float32.

    mask: [B, L], its row sums give how many trailing tokens to pool (inputs are left-padded, so
    the pooled tokens are the last ones, as in llm2vec). bos_mask: [B, L] bool, where the BOS
    tokens are; bos_token pooling takes the first one of each row.
    """
    hidden = hidden.float()
    if mode in ("eos_token", "last_token"):
        return hidden[:, -1]
    if mode == "bos_token":
        if bos_mask is None or not bool(bos_mask.any(dim=1).all()):
            raise ValueError("bos_token pooling needs a BOS token in every text (does the tokenizer add one?)")
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), bos_mask.int().argmax(dim=1)]
    length = hidden.shape[1]
    counts = mask.sum(dim=1, keepdim=True)  # [B, 1]
    rank = torch.arange(length, device=hidden.device) - (length - counts) + 1  # 1.. over the pooled tokens
    if mode == "mean":
        weights = (rank > 0).float() / counts.clamp(min=1)
    elif mode == "weighted_mean":
        weights = rank.clamp(min=0).float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    else:
        raise ValueError(f"unknown pooling mode '{mode}'; use one of {', '.join(POOLING_MODES)}")
    return torch.einsum("bl,bld->bd", weights, hidden)
