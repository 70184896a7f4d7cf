"""Time llm2vec 0.2.3's LLM2Vec.encode on a random Llama of the given shape on the GPU; run by bench/gpu.py.

    python llm2vec_gpu_encode.py SPEC.json RESULT.json

It runs under a Python that has llm2vec and transformers 4.44.2 (never the project's), so it imports
nothing from the project. SPEC.json: {"config": LlamaConfig kwargs, "tokenizer": a tokenizer folder that
tokenizers 0.19 reads, "eos_token", "captions": [...], "batch_size", "max_length", "device" (default cuda)}.
The model is llm2vec's own bidirectional LlamaBiModel, built in bf16 with random weights; RESULT.json gets
the seconds of two passes over the captions: the first (cold) and the second (timed).
"""

import json
import sys
import time
from pathlib import Path

import torch
from llm2vec import LLM2Vec
from llm2vec.models import LlamaBiModel
from transformers import AutoTokenizer, LlamaConfig


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tokenizer.pad_token, tokenizer.padding_side = spec["eos_token"], "left"  # as LLM2Vec.from_pretrained sets them
    torch.set_default_dtype(torch.bfloat16)
    device = spec.get("device", "cuda")
    with torch.device(device):
        model = LlamaBiModel(LlamaConfig(**spec["config"])).eval()
    torch.set_default_dtype(torch.float32)
    encoder = LLM2Vec(model, tokenizer, pooling_mode="mean", max_length=spec["max_length"])
    captions, batch_size = spec["captions"], spec["batch_size"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = []
    for _ in range(2):  # the first pass meets every padded length for the first time; the second is timed warm
        sync()
        start = time.perf_counter()
        encoder.encode(captions, batch_size=batch_size, show_progress_bar=False, device=device)
        sync()
        seconds.append(time.perf_counter() - start)
    Path(result_path).write_text(json.dumps({"first_pass_seconds": seconds[0], "seconds": seconds[1]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
