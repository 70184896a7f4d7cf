"""bf16 autocast on the CPU against fp32, for the tiny models' training steps.

    python bench/cpu_bf16.py [--rounds 5] [--threads 2]

`train.precision: auto` trains in bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16 or
AMX: `llm2clip.training.native_bf16`), fp32 elsewhere. This bench measures what that buys, one forward
and backward at a time, in one process, the two precisions alternating within each round:
  tiny LLM      the tiny-LLM Llama (4 layers, width 256, vocabulary 1000), 16 sequences of 128 tokens:
                the step of `llm2clip tiny-llm`, `stage1 mntp` and `stage1 contrastive`
  stage-2 ViT   the stage-2 ViT (64 px, patch 8, 4 layers, width 192) on 128 images: the image side of
                `llm2clip stage2`, both towers
Prints the median seconds per step over rounds, the ratios and the relative loss difference.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llm2clip.training import native_bf16
from table import Note, Ratio


def tiny_llm_step() -> tuple[torch.nn.Module, callable]:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    ids = torch.randint(0, 1000, (16, 128), generator=torch.Generator().manual_seed(0))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def vit_step() -> tuple[torch.nn.Module, callable]:
    model = CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                                             num_hidden_layers=4, num_attention_heads=3))
    images = torch.randn(128, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model, lambda: model(pixel_values=images).pooler_output.square().mean()


def timed(model: torch.nn.Module, loss_fn, bf16: bool) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with context:
        loss = loss_fn()
    loss.backward()
    return time.perf_counter() - start, loss.item()


def run(argv: list[str] | None = None) -> list[Ratio | Note]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    bench = "CPU bf16 autocast"
    if torch.cuda.is_available() or not native_bf16():
        print("this CPU has no native bf16 (AVX512-BF16 or AMX): `precision: auto` trains in fp32 here; nothing to compare")
        return [Note(bench, "fp32 / bf16 autocast", "no native bf16 on this CPU")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, build in (("tiny LLM", tiny_llm_step), ("stage-2 ViT", vit_step)):
        model, loss_fn = build()
        for bf16 in (False, True):
            timed(model, loss_fn, bf16)  # warm-up, not timed
        times = {False: [], True: []}
        losses = {}
        for round_ in range(args.rounds):
            for bf16 in ((False, True) if round_ % 2 == 0 else (True, False)):  # each goes first in turn
                seconds, losses[bf16] = timed(model, loss_fn, bf16)
                times[bf16].append(seconds)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:12s} fp32 {fp32:.3f} s/step, bf16 autocast {bf16:.3f} s/step: {fp32 / bf16:.2f}x; "
              f"loss {losses[False]:.4f} against {losses[True]:.4f} "
              f"(relative difference {abs(losses[False] - losses[True]) / abs(losses[False]):.1e}); "
              f"{args.threads} threads, median of {args.rounds}")
        rows.append(Ratio(bench, f"{name}: fp32 / bf16 autocast", fp32, bf16, "s/step"))
    return rows


if __name__ == "__main__":
    run()
