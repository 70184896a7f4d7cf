import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2clip.losses import CaptionContrastiveLoss, gather_features

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
    assert diffs, "the rank script compared no loss"
    for name, diff in diffs.items():
        assert diff["grad_norm"] > 1e-3, f"{name}: gradient too small to compare"
        assert diff["loss"] <= 1e-5, f"{name}: loss differs by {diff['loss']}"
        assert diff["grad"] <= 1e-5, f"{name}: gradient differs by {diff['grad']}"
