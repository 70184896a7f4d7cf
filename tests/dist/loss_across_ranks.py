"""Run under `torchrun --nproc_per_node N`: compares a multi-rank loss step with one process on the full batch.

Each rank embeds its slice of a fixed batch with a shared linear layer, computes the loss and
averages the layer's gradient over ranks as DDP does. Rank 0 then runs the reference on the whole
batch and writes the largest differences to the JSON file given as argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist

from llm2clip.losses import CaptionContrastiveLoss

LOSSES = {"caption_contrastive": lambda: CaptionContrastiveLoss(scale=50.0)}


def step(loss_fn, layer, anchors, positives):
    layer.zero_grad()
    loss = loss_fn(layer(anchors), layer(positives))
    loss.backward()
    return loss.detach(), layer.weight.grad.detach().clone()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    per_rank, dim = 4, 8
    anchors = torch.randn(per_rank * world, dim, dtype=torch.float64)
    positives = anchors + 0.3 * torch.randn_like(anchors)
    layer = torch.nn.Linear(dim, dim, bias=False).double()
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    for name, make in LOSSES.items():
        loss, grad = step(make(), layer, anchors[local], positives[local])
        dist.all_reduce(loss)
        dist.all_reduce(grad)
        loss, grad = loss / world, grad / world
        report[name] = (loss, grad)
    dist.destroy_process_group()
    if rank == 0:
        diffs = {}
        for name, make in LOSSES.items():
            ref_loss, ref_grad = step(make(), layer, anchors, positives)
            loss, grad = report[name]
            diffs[name] = {
                "loss": float((loss - ref_loss).abs()),
                "grad": float((grad - ref_grad).abs().max()),
                "grad_norm": float(ref_grad.norm()),
            }
        with open(out_path, "w") as f:
            json.dump(diffs, f)


if __name__ == "__main__":
    main(sys.argv[1])
