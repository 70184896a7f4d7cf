"""Run under `torchrun --nproc_per_node N`: compares a multi-rank loss step with one process on the full batch.

Each rank embeds its slice of a fixed batch with two towers (an image layer and a text layer, as in
CLIP), computes the loss with a learnable logit scale and bias, and averages the gradients of all
parameters over ranks as DDP does. Rank 0 then runs the reference on the whole batch and writes the
largest differences to the JSON file given as argv[1]. Entries whose gradient is an approximation by
design report the loss only.
"""

import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llm2clip.losses import CaptionContrastiveLoss, ClipLoss, SigLipLoss


class Towers(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.image = nn.Linear(dim, dim, bias=False)
        self.text = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def features(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)


def caption_contrastive(towers, images, texts):
    return CaptionContrastiveLoss(scale=50.0)(towers.image(images), towers.text(texts))


def contrastive(loss_fn, with_bias=False):
    def run(towers, images, texts):
        bias = towers.logit_bias if with_bias else None
        return loss_fn(*towers.features(images, texts), towers.logit_scale.exp(), bias)

    return run


# name -> (loss step, whether its gradients must match the single-process run exactly)
LOSSES = {
    "caption_contrastive": (caption_contrastive, True),
    "clip": (contrastive(ClipLoss()), True),
    "clip_global_matrix": (contrastive(ClipLoss(local_loss=False)), True),
    "clip_gather_without_grad": (contrastive(ClipLoss(gather_with_grad=False)), False),
    "siglip": (contrastive(SigLipLoss(), with_bias=True), True),
    "siglip_without_bias": (contrastive(SigLipLoss()), True),
}


def step(run, towers, images, texts):
    towers.zero_grad(set_to_none=False)
    loss = run(towers, images, texts)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in towers.named_parameters()}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    per_rank, dim = 4, 8
    images = torch.randn(per_rank * world, dim, dtype=torch.float64)
    texts = images + 0.5 * torch.randn_like(images)
    towers = Towers(dim).double()
    for p in towers.parameters():
        p.grad = torch.zeros_like(p)
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    for name, (run, _) in LOSSES.items():
        loss, grads = step(run, towers, images[local], texts[local])
        for tensor in (loss, *grads.values()):
            dist.all_reduce(tensor)
            tensor /= world
        report[name] = (loss, grads)
    dist.destroy_process_group()
    if rank == 0:
        diffs = {}
        for name, (run, exact_grad) in LOSSES.items():
            ref_loss, ref_grads = step(run, towers, images, texts)
            loss, grads = report[name]
            diffs[name] = {"loss": float((loss - ref_loss).abs())}
            if exact_grad:
                diffs[name]["grad"] = max(float((grads[p] - ref_grads[p]).abs().max()) for p in ref_grads)
                diffs[name]["grad_norm"] = float(torch.cat([g.flatten() for g in ref_grads.values()]).norm())
                diffs[name]["params_with_grad"] = [p for p, g in ref_grads.items() if g.abs().max() > 1e-6]
        with open(out_path, "w") as f:
            json.dump(diffs, f)


if __name__ == "__main__":
    main(sys.argv[1])
