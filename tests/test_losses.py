import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm2clip.losses import CaptionContrastiveLoss, ClipLoss, SigLipLoss, gather_features

SCRIPT = Path(__file__).parent / "dist" / "loss_across_ranks.py"


def test_caption_contrastive_loss_matches_cross_entropy_by_hand():
    torch.manual_seed(0)
    anchors, positives = torch.randn(5, 6), torch.randn(5, 6)
    loss = CaptionContrastiveLoss(scale=20.0)(anchors, positives)
    a = anchors / anchors.norm(dim=-1, keepdim=True)
    p = positives / positives.norm(dim=-1, keepdim=True)
    logits = 20.0 * a @ p.T
    expected = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_caption_contrastive_loss_is_low_for_aligned_pairs():
    torch.manual_seed(0)
    anchors = torch.randn(8, 16)
    aligned = CaptionContrastiveLoss()(anchors, anchors)
    shuffled = CaptionContrastiveLoss()(anchors, anchors.roll(1, dims=0))
    assert aligned < 0.01 < shuffled


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 4)
    assert gather_features(x) is x


def _unit_pairs(n: int = 5, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(n, dim, dtype=torch.float64)
    texts = images + 0.5 * torch.randn_like(images)
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_matches_symmetric_cross_entropy_by_hand(local_loss):
    images, texts = _unit_pairs()
    scale = torch.tensor(14.0, dtype=torch.float64)
    loss = ClipLoss(local_loss=local_loss)(images, texts, scale)
    terms = []
    for i in range(len(images)):
        row = [float(scale * images[i] @ texts[j]) for j in range(len(texts))]
        column = [float(scale * texts[i] @ images[j]) for j in range(len(images))]
        terms.append(math.log(sum(map(math.exp, row))) - row[i])
        terms.append(math.log(sum(map(math.exp, column))) - column[i])
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-10)


def test_clip_loss_ignores_a_shared_bias():
    images, texts = _unit_pairs()
    scale = torch.tensor(14.0, dtype=torch.float64)
    with_bias = ClipLoss()(images, texts, scale, torch.tensor(-3.0, dtype=torch.float64))
    assert torch.allclose(with_bias, ClipLoss()(images, texts, scale))


@pytest.mark.parametrize("bias", [-10.0, 0.0, None])
def test_siglip_loss_matches_pairwise_sigmoid_by_hand(bias):
    images, texts = _unit_pairs()
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = SigLipLoss()(images, texts, scale, None if bias is None else torch.tensor(bias, dtype=torch.float64))
    total = 0.0
    for i in range(len(images)):
        for j in range(len(texts)):
            label = 1.0 if i == j else -1.0
            logit = float(scale * images[i] @ texts[j]) + (bias or 0.0)
            total += math.log1p(math.exp(-label * logit))
    assert loss.item() == pytest.approx(total / len(images), abs=1e-10)


def test_losses_prefer_matching_pairs():
    images, _ = _unit_pairs(n=8)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    for loss_fn in (ClipLoss(), SigLipLoss()):
        assert loss_fn(images, images, scale, bias) < loss_fn(images, images.roll(1, dims=0), scale, bias)


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "diffs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(out)],
        check=True, env=env, timeout=300,
    )
    diffs = json.loads(out.read_text())
    assert {"caption_contrastive", "clip", "clip_global_matrix", "siglip"} <= diffs.keys()
    for name, diff in diffs.items():
        assert diff["loss"] <= 1e-5, f"{name}: loss differs by {diff['loss']}"
        if "grad" not in diff:  # an approximate gradient by design: only the loss must match
            continue
        assert diff["grad_norm"] > 1e-3, f"{name}: gradient too small to compare"
        assert diff["grad"] <= 1e-5, f"{name}: gradient differs by {diff['grad']}"
        assert {"image.weight", "text.weight"} <= set(diff["params_with_grad"]), name
    for name in ("clip", "clip_global_matrix", "siglip", "siglip_without_bias"):
        assert "logit_scale" in diffs[name]["params_with_grad"], f"{name}: the logit scale got no gradient"
    assert "logit_bias" in diffs["siglip"]["params_with_grad"]
