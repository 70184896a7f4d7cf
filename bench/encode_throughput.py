"""Captions per second: LLMEncoder.encode against llm2vec 0.2.3's LLM2Vec.encode, side by side.

    python bench/encode_throughput.py [--model DIR] [--captions 2000] [--batch-size 32] [--threads 2]

Same model, captions, batch size, pooling and thread count for both. llm2vec runs in its own venv
(scripts/setup_parity_venv.sh) and times its encode call itself; loading is never timed, and each
side gets a warm-up call first. Prints both rates, the ratio ours/llm2vec and the largest
difference between the two sets of embeddings. Without --model, a randomly initialised Llama of
the tiny-LLM size with a BPE tokenizer trained on the captions is built in a temp directory.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModel, LlamaConfig

from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.tokenizer_training import train_tokenizer
from table import Ratio

ROOT = Path(__file__).resolve().parents[1]
COLOURS = "red blue green yellow crimson purple orange black white grey".split()
SHAPES = "circle square triangle box star disk ring cross diamond hexagon".split()
SIZES = "small big tiny large medium".split()
RELATIONS = ["left of", "right of", "above", "below", "next to", "far from"]


def captions(n: int, seed: int = 0) -> list[str]:
    """Scene captions of mixed length: a third short, a third medium, a third long (dense)."""
    rng = random.Random(seed)

    def thing() -> str:
        return f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"

    out = []
    for i in range(n):
        clauses = 1 if i % 3 == 0 else rng.randint(2, 3) if i % 3 == 1 else rng.randint(4, 6)
        out.append(" and ".join(f"{thing()} {rng.choice(RELATIONS)} {thing()}" for _ in range(clauses)))
    return out


def build_model(out: Path, texts: list[str]) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size=4096, model_max_length=1024)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LLMEncoder(AutoModel.from_config(config), tokenizer).save_pretrained(out)
    return out


def time_ours(encoder: LLMEncoder, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    embeddings = encoder.encode(texts, batch_size=batch_size, show_progress=False)
    return time.perf_counter() - start, embeddings.numpy()


def time_llm2vec(python: str, model: Path, texts: list[str], args: argparse.Namespace,
                 work: Path) -> tuple[float, np.ndarray]:
    """One llm2vec process: a warm-up call, then the timed one."""
    job = {"model": str(model), "pooling_mode": args.pooling, "batch_size": args.batch_size}
    jobs = [{**job, "texts": texts[: args.batch_size * 2], "out": str(work / "warmup.npy")},
            {**job, "texts": texts, "out": str(work / "llm2vec.npy")}]
    (work / "jobs.json").write_text(json.dumps({"threads": args.threads, "jobs": jobs}))
    result = subprocess.run([python, str(ROOT / "tests" / "parity" / "llm2vec_encode.py"), str(work / "jobs.json"),
                             str(work / "results.json")], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"llm2vec failed:\n{result.stderr[-3000:]}")
    return json.loads((work / "results.json").read_text())[1]["seconds"], np.load(work / "llm2vec.npy")


def run(argv: list[str] | None = None) -> list[Ratio]:
    """Runs the bench as its command line `argv` says, prints its report and returns its ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="encoder directory (default: build a tiny-LLM-sized Llama)")
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    # One thread keeps timings steady on a shared 2-core machine: two OpenMP threads competing
    # with other processes made single runs vary from 6 to 65 s.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per side; the best counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    python = subprocess.run(["bash", str(ROOT / "scripts" / "setup_parity_venv.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    texts = captions(args.captions)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or build_model(work / "model", texts)
        encoder = LLMEncoder.from_pretrained(model, pooling_mode=args.pooling, dtype="float32", device="cpu")
        encoder.encode(texts[: args.batch_size * 2], batch_size=args.batch_size, show_progress=False)  # warm-up
        ours, theirs = [], []
        for _ in range(args.repeats):
            seconds, ours_embeddings = time_ours(encoder, texts, args.batch_size)
            ours.append(seconds)
            seconds, theirs_embeddings = time_llm2vec(python, model, texts, args, work)
            theirs.append(seconds)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"model {model if args.model else 'random Llama, hidden 256, 4 layers'}; {len(texts)} captions "
          f"({words:.1f} words on average); batch {args.batch_size}; {args.pooling} pooling; "
          f"{args.threads} thread(s); best of {args.repeats} alternating runs")
    for name, runs in (("llm2vec 0.2.3 (transformers 4.44.2)", theirs),
                       (f"LLMEncoder (transformers {transformers.__version__})", ours)):
        print(f"{name:38s} {len(texts) / min(runs):8.1f} captions/s  (runs: {', '.join(f'{t:.2f}' for t in runs)} s)")
    print(f"ratio ours/llm2vec: {min(theirs) / min(ours):.2f}x; max abs diff of embeddings: "
          f"{np.abs(ours_embeddings - theirs_embeddings).max():.2e}")
    return [Ratio("caption encoding, tiny Llama (CPU)", "LLMEncoder / llm2vec 0.2.3", len(texts) / min(ours),
                  len(texts) / min(theirs), "captions/s")]


if __name__ == "__main__":
    run()
