"""Every bench in bench/, one after another, and one table of their ratios.

    python bench/run_all.py [--quick] [--gpu | --no-gpu] [--llm2vec-python PY] [--out TABLE.md]

Each bench prints its own report as it runs (see bench/README.md); the table at the end lists, for every
ratio, the bench, what is compared, the ratio and the two values measured side by side. `--quick` gives
CI-sized runs (fewer captions, rounds and samples: rougher numbers). `--gpu` (the default when CUDA is
present) adds the GPU benches of bench/gpu.py. A bench that cannot run (a missing dependency, an error)
gets a row saying why, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the benches and `mllm` do; read once, when torch loads

import torch  # noqa: E402 (after the OpenMP policy)

from llm2clip.fileio import atomic_write_text  # noqa: E402
from llm2clip.logs import setup_logging  # noqa: E402
from table import Note, Ratio, format_table  # noqa: E402

# (bench, its arguments for a full run, for a --quick run)
CPU_BENCHES = {
    "stage2_throughput": ([], ["--batch", "32", "--steps", "1", "--rounds", "2", "--warmup", "1"]),
    "encode_throughput": ([], ["--captions", "200", "--repeats", "1"]),
    "llava_step": ([], ["--batch", "4", "--rounds", "2"]),
    "cpu_bf16": ([], ["--rounds", "2"]),
}


def run_bench(name: str, run: Callable[[], list[Ratio | Note]]) -> list[Ratio | Note]:
    """The bench's rows, or one row with the error that stopped it."""
    print(f"\n== {name}", flush=True)
    try:
        return run()
    except (Exception, SystemExit) as err:  # a bench's own sys.exit (llm2vec failed) included
        traceback.print_exc()
        return [Note(name, "-", f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")]


def main(argv: list[str] | None = None) -> list[Ratio | Note]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized runs")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the GPU benches (default: when CUDA is available)")
    parser.add_argument("--only", nargs="+", choices=[*CPU_BENCHES, "gpu"], help="run these benches only")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--llm2vec-python", help="a python with llm2vec 0.2.3 for the GPU encoding bench "
                        "(default: .venv-llm2vec/bin/python)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    setup_logging()  # no expected library warnings or progress-bar frames between the reports
    if gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA, and torch sees no GPU here")

    rows: list[Ratio | Note] = []
    for name, (full, quick) in CPU_BENCHES.items():
        if args.only and name not in args.only:
            continue
        module = __import__(name)
        rows += run_bench(name, lambda: module.run(quick if args.quick else full))
    if gpu and (not args.only or "gpu" in args.only):
        import gpu as gpu_benches
        from encode_throughput import captions

        rows += run_bench("gpu stage 2", lambda: gpu_benches.stage2(steps=3 if args.quick else 10))
        texts = captions(512 if args.quick else 4096)
        rows += run_bench("gpu encoding", lambda: gpu_benches.encode(texts, llm2vec_python=args.llm2vec_python))
    table = format_table(rows)
    print(f"\n{table}")
    if args.out:
        atomic_write_text(args.out, table + "\n")
    return rows


if __name__ == "__main__":
    main()
