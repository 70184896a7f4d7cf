"""Whitening statistics of cached caption embeddings, for the LLM2CLIP text adapter's input.

Mean-pooled LLM embeddings crowd into a few directions (the tiny stage-1 encoder's 256 dimensions have
an effective rank of about 7, and random long captions have cosine 0.77). Whitening them first
(BERT-whitening, Su et al. 2021) lets the adapter use the small directions too:

    x -> (x - mean) @ W,   W = V diag((lambda + eps * lambda_max) ** -1/2) V^T   (ZCA)

where lambda, V are the eigenpairs of the covariance. The statistics are fitted on the rows stage 2
draws from, each kind weighted by its share of the caption mix.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from llm2clip.embed.cache import KINDS, EmbeddingCache
from llm2clip.errors import InputError

CHUNK_ROWS = 4096


def _row_weights(cache: EmbeddingCache, kind_weights: Mapping[str, float], max_rows: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (sorted) and their weights: each kind's rows share its weight equally."""
    kinds = np.asarray(cache.row_kind)
    rows, weights = [], []
    for kind, weight in kind_weights.items():
        if weight <= 0:
            continue
        ids = np.flatnonzero(kinds == KINDS.index(kind))
        if ids.size:
            rows.append(ids)
            weights.append(np.full(ids.size, weight / ids.size))
    if not rows:
        raise InputError(f"cache {cache.path} holds no rows of the kinds {', '.join(kind_weights)} to whiten with")
    rows, weights = np.concatenate(rows), np.concatenate(weights)
    if rows.size > max_rows:  # a seeded subset keeps the kinds' shares in expectation
        keep = np.sort(np.random.default_rng(seed).choice(rows.size, max_rows, replace=False))
        rows, weights = rows[keep], weights[keep]
    order = np.argsort(rows, kind="stable")  # shard by shard
    return rows[order], weights[order] / weights.sum()


def fit_whitening(cache: EmbeddingCache, kind_weights: Mapping[str, float], relative_eps: float,
                  max_rows: int = 200_000, seed: int = 0,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean [dim] and ZCA whitening matrix [dim, dim] (float32) of the cache's rows.

    `relative_eps` (stage 2's `adapter.whiten_eps`, which owns the default) is added to every eigenvalue
    as a fraction of the largest, so near-empty directions are lifted to at most 1/sqrt(relative_eps)
    times, not to unit variance. Two passes over at most `max_rows` rows, accumulated in float64.
    """
    if not 0 < relative_eps <= 1:
        raise InputError(f"the whitening eps must lie in (0, 1], got {relative_eps}")
    rows, weights = _row_weights(cache, kind_weights, max_rows, seed)
    if rows.size < 2:
        raise InputError(f"cache {cache.path} has {rows.size} row(s) of the mixed kinds; whitening needs at least 2")

    def chunks():
        for start in range(0, rows.size, CHUNK_ROWS):
            block = cache.embeddings(rows[start : start + CHUNK_ROWS], dtype=np.float64)
            yield torch.from_numpy(block).to(device), torch.from_numpy(weights[start : start + CHUNK_ROWS]).to(device)

    mean = torch.zeros(cache.dim, dtype=torch.float64, device=device)
    for x, w in chunks():
        mean += w @ x
    covariance = torch.zeros(cache.dim, cache.dim, dtype=torch.float64, device=device)
    for x, w in chunks():
        centred = x - mean
        covariance += centred.T @ (centred * w[:, None])
    if not torch.isfinite(covariance).all():
        raise InputError(f"cache {cache.path} holds non-finite embeddings; rebuild it with `llm2clip embed`")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=0)
    if eigenvalues[-1] <= 0:
        raise InputError(f"the cached embeddings in {cache.path} are all equal; there is nothing to whiten")
    scale = (eigenvalues + relative_eps * eigenvalues[-1]).rsqrt()
    matrix = (eigenvectors * scale) @ eigenvectors.T
    return mean.float().cpu(), matrix.float().cpu()
