"""Encode texts with llm2vec 0.2.3; runs in the parity venv (transformers 4.44.2), never in the project's.

    python llm2vec_encode.py JOBS.json RESULTS.json

JOBS.json: {"threads": int or null, "jobs": [{"model", "adapter", "pooling_mode", "max_length",
"doc_max_length", "instruction", "texts", "batch_size", "out"}, ...]}; null settings are left to
llm2vec (its llm2vec_config.json, then its defaults). Each job writes float32 [N, D] to its "out"
.npy; RESULTS.json gets the seconds spent in `LLM2Vec.encode` alone for every job.
"""

import json
import sys
import time

import numpy as np
import torch
from llm2vec import LLM2Vec

SETTINGS = ("pooling_mode", "max_length", "doc_max_length")


def main(jobs_path: str, results_path: str) -> None:
    spec = json.load(open(jobs_path))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    results = []
    for job in spec["jobs"]:
        settings = {key: job[key] for key in SETTINGS if job.get(key) is not None}
        model = LLM2Vec.from_pretrained(job["model"], peft_model_name_or_path=job.get("adapter"), **settings)
        pairs = [[job.get("instruction", ""), text] for text in job["texts"]]
        start = time.perf_counter()
        embeddings = model.encode(pairs, batch_size=job.get("batch_size", 32), show_progress_bar=False)
        seconds = time.perf_counter() - start
        np.save(job["out"], embeddings.numpy().astype(np.float32))
        results.append({"out": job["out"], "seconds": seconds, "pooling_mode": model.pooling_mode})
    json.dump(results, open(results_path, "w"), indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
