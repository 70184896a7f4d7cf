"""LLaVA finetune step, side by side: what `mllm finetune` runs now against what it ran before.

    python bench/llava_step.py [--batch 16] [--rounds 5] [--threads 2]

Builds a synthetic world (64 px), a random Llama of the tiny-LLM size (4 layers, width 256, a BPE
vocabulary trained on the world's corpus) and a random tower of the stage-2 size (4 layers, width 192,
patch 8: 64 image tokens), assembles them into a Llava and takes one batch of the world's instruction
data (vicuna_v1, LLaVA's masking). Two changes are measured, each as forward and backward of that batch:
  logits        answers only: the LlavaTrainer passes logits_to_keep=answer_positions and scores them with
                answer_loss; every token: the model's own loss, with the LM head over every position.
  OpenMP wait   PASSIVE (what `mllm` sets unless OMP_WAIT_POLICY is given) against libgomp's default, which
                spins idle threads and, on cores shared with other processes, makes every parallel op wait.
The policy is read once, when torch loads OpenMP, so each policy gets its own worker process (same seed,
same model and batch); each round runs both steps in both workers, each of the four going first in turn,
so machine noise hits all four alike. Prints the median seconds per step over rounds, the ratios and the
largest loss difference.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llm2clip.clip.modeling_llm2clip import clip_image_processor
from llm2clip.data.records import read_corpus
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.logs import setup_logging
from llm2clip.text.tokenizer_training import save_tokenizer, train_tokenizer
from mllm.builder import BuildSettings, build_llava
from mllm.data import IGNORE_INDEX, LlavaCollator, LlavaDataset, read_llava_json
from mllm.templates import vicuna_v1
from mllm.train import answer_loss, answer_positions
from table import Ratio


def build(root: Path, batch_size: int):
    generate_world(SynthConfig(out_dir=root / "world", n_train=max(400, batch_size), n_val=2, n_test=2))
    tokenizer = train_tokenizer(read_corpus(root / "world" / "corpus.txt"), vocab_size=4096, model_max_length=1024)
    save_tokenizer(tokenizer, root / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                                     num_hidden_layers=4, num_attention_heads=3)).save_pretrained(root / "tower")
    clip_image_processor(64).save_pretrained(root / "tower")
    model, processor = build_llava(BuildSettings(vision_tower=root / "tower", llm=root / "llm"))
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith("model.vision_tower.")  # finetune: the tower stays frozen
    samples, _ = read_llava_json(root / "world" / "llava" / "finetune.json", root / "world")
    dataset = LlavaDataset([s for s in samples if s.image is not None][:batch_size], processor, vicuna_v1(), 2048)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    batch.pop("truncated")
    return model, batch


def every_token(model, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def answers_only(model, batch) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = answer_loss(model(**inputs, logits_to_keep=answer_positions(labels)), labels)
    loss.backward()
    return loss.detach()


STEPS = {"answers only": answers_only, "every token": every_token}
POLICIES = {"PASSIVE": "PASSIVE", "default": None}  # None: OMP_WAIT_POLICY unset (libgomp's default)


def worker(connection, batch_size: int, threads: int) -> None:
    """Builds the model and batch, then times a step of the kind it is sent, until it is sent None."""
    setup_logging()  # a fresh (spawned) process: no expected library warnings between the reports
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = build(Path(tmp), batch_size)
    losses = {name: step(model, batch).item() for name, step in STEPS.items()}  # warm-up, not timed
    labels = batch["labels"]
    connection.send({"losses": losses, "shape": tuple(labels.shape), "learned": (labels != IGNORE_INDEX).sum().item(),
                     "tokens": batch["attention_mask"].sum().item(), "kept": len(answer_positions(labels)),
                     "vocabulary": model.config.text_config.vocab_size})
    while (name := connection.recv()) is not None:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        STEPS[name](model, batch)
        connection.send(time.perf_counter() - start)


def start_worker(policy: str | None, args: argparse.Namespace):
    """A worker process whose torch loads OpenMP under `policy` (the environment is read at its start)."""
    os.environ.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=worker, args=(child, args.batch, args.threads))
    process.start()
    return process, parent


def run(argv: list[str] | None = None) -> list[Ratio]:
    """Runs the bench as its command line `argv` says, prints its report and returns its ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    workers = {name: start_worker(policy, args) for name, policy in POLICIES.items()}
    info = {name: connection.recv() for name, (_, connection) in workers.items()}
    times = {(policy, step): [] for policy in POLICIES for step in STEPS}
    order = list(times)
    for round_ in range(args.rounds):
        for policy, step in order[round_ % len(order):] + order[:round_ % len(order)]:  # each goes first in turn
            time.sleep(0.5)  # the previous worker's idle threads stop spinning
            connection = workers[policy][1]
            connection.send(step)
            times[policy, step].append(connection.recv())
    for process, connection in workers.values():
        connection.send(None)
        process.join()

    first = info["PASSIVE"]
    print(f"batch {first['shape']}: {first['learned']} learned tokens of {first['tokens']}; logits at {first['kept']} "
          f"of {first['shape'][1]} positions; vocabulary {first['vocabulary']}; {args.threads} threads")
    median = {key: statistics.median(t) for key, t in times.items()}
    for (policy, step), seconds in median.items():
        print(f"OpenMP {policy:8s} {step:13s} {seconds:.3f} s/step (forward + backward, median of {args.rounds})")
    before, after = median["default", "every token"], median["PASSIVE", "answers only"]
    print(f"logits, every token / answers only (PASSIVE): "
          f"{median['PASSIVE', 'every token'] / median['PASSIVE', 'answers only']:.2f}x")
    print(f"OpenMP, default / PASSIVE (answers only): {median['default', 'answers only'] / after:.2f}x")
    print(f"before / after (default and every token / PASSIVE and answers only): {before / after:.2f}x")
    differences = [abs(i["losses"]["every token"] - i["losses"]["answers only"]) for i in info.values()]
    print(f"largest loss difference between the two steps: {max(differences):.2e}")
    bench = f"LLaVA finetune step, batch {args.batch} (CPU)"
    return [Ratio(bench, "every-token logits / answers only (PASSIVE)", median["PASSIVE", "every token"],
                  median["PASSIVE", "answers only"], "s/step"),
            Ratio(bench, "OpenMP default / PASSIVE (answers only)", median["default", "answers only"], after, "s/step"),
            Ratio(bench, "before / after", before, after, "s/step")]


if __name__ == "__main__":
    run()
