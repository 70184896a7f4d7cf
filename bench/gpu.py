"""GPU benches at the paper's shapes, with random weights: stage-2 training and caption encoding.

    python bench/run_all.py --gpu

- stage 2: an LLM2CLIPModel with a ViT-L/14-336 tower and the paper's adapter (4 x 4096 -> 8192 blocks, projection
  1280) trains on random pixels and random caption embeddings, in bf16 autocast with fused AdamW, at the largest
  batch (a power of two up to --max-batch) that fits. It reports samples/s and the model FLOP utilisation (MFU):
  the matmul FLOPs of forward and backward (3 x forward) per second, over the GPU's dense bf16 peak.
- encoding: LLMEncoder over a Llama-3-8B-shaped LlamaModel (bf16, mean pooling, max length 512) encodes mixed-length
  captions; captions/s and MFU (forward FLOPs of the real, unpadded tokens). llm2vec is timed beside it on the same
  model when it imports (it needs transformers <= 4.44.2, so in this project's venv it does not).

The FLOP counts are plain functions of the shapes (tests check them against torch's FlopCounterMode). Importing
this module touches no GPU.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from table import Note, Ratio

ROOT = Path(__file__).resolve().parents[1]

VIT_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "patch_size": 14, "image_size": 336}
PAPER_ADAPTER = {"text_embed_dim": 4096, "adapter_depth": 4, "adapter_hidden_dim": 8192, "projection_dim": 1280,
                 "adapter_input_l2norm": True, "text_projection_bias": True}
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192}
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets; the first match counts.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def vit_forward_flops(image_size: int, patch_size: int, hidden_size: int, intermediate_size: int,
                      num_hidden_layers: int, projection_dim: int = 0, num_channels: int = 3, **_) -> int:
    """Matmul FLOPs of one image through a CLIP ViT (patch conv, attention, MLP; CLS projection)."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    embed = 2 * patches * num_channels * patch_size**2 * hidden_size
    layer = (8 * tokens * hidden_size**2  # q, k, v and output projections
             + 4 * tokens**2 * hidden_size  # scores and the weighted sum of values
             + 4 * tokens * hidden_size * intermediate_size)  # the two MLP matmuls
    return embed + num_hidden_layers * layer + 2 * hidden_size * projection_dim


def adapter_forward_flops(text_embed_dim: int, adapter_depth: int, adapter_hidden_dim: int, projection_dim: int,
                          **_) -> int:
    """Matmul FLOPs of one caption embedding through the residual MLP blocks and the text projection."""
    return adapter_depth * 4 * text_embed_dim * adapter_hidden_dim + 2 * text_embed_dim * projection_dim


def llama_forward_flops(length: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                        num_attention_heads: int, num_key_value_heads: int, **_) -> int:
    """Matmul FLOPs of one `length`-token sequence through a Llama base model (no LM head)."""
    kv_width = hidden_size // num_attention_heads * num_key_value_heads
    layer = (2 * length * hidden_size * (2 * hidden_size + 2 * kv_width)  # q and o; k and v (grouped)
             + 4 * length**2 * hidden_size  # scores and the weighted sum of values
             + 6 * length * hidden_size * intermediate_size)  # gate, up and down
    return num_hidden_layers * layer


def _timed(step, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def stage2(steps: int = 10, max_batch: int = 1024) -> list[Ratio | Note]:
    """Training samples/s and MFU of the ViT-L/14-336 LLM2CLIP at the largest batch that fits."""
    from llm2clip import LLM2CLIPConfig, LLM2CLIPModel

    bench = "stage 2, ViT-L/14-336 + paper adapter, bf16 (GPU)"
    config = LLM2CLIPConfig(vision_config=VIT_L14_336, **PAPER_ADAPTER)
    model = LLM2CLIPModel(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=True)
    size = VIT_L14_336["image_size"]

    def step_at(batch: int):
        pixels = torch.randn(batch, 3, size, size, device="cuda")
        captions = torch.randn(batch, config.text_embed_dim, device="cuda", dtype=torch.float16)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(pixels, captions, return_loss=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()

        return step

    batch = max_batch
    while True:  # the largest power of two that fits, found by trying
        try:
            step = step_at(batch)
            _timed(step, 2)  # warm-up
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch == 1:
                return [Note(bench, "samples/s", "out of memory at batch 1")]
            batch //= 2
    seconds = _timed(step, steps)
    samples_per_second = batch * steps / seconds
    flops = 3 * (vit_forward_flops(**VIT_L14_336, projection_dim=config.projection_dim)
                 + adapter_forward_flops(**PAPER_ADAPTER))
    return _mfu_rows(f"{bench}, batch {batch}", samples_per_second, flops, "samples/s")


def encode(captions: list[str], batch_size: int = 64, llm2vec_python: str | None = None) -> list[Ratio | Note]:
    """Captions/s and MFU of LLMEncoder over a Llama-3-8B-shaped model, and llm2vec's captions/s beside it.

    llm2vec needs transformers <= 4.44.2, so it runs in its own process under `llm2vec_python` (default: the
    parity venv's python, `.venv-llm2vec/bin/python`, when it exists) on a model of the same shape."""
    from transformers import LlamaConfig, LlamaModel

    from llm2clip import LLMEncoder
    from llm2clip.text.portability import make_tokenizer_portable
    from llm2clip.text.tokenizer_training import train_tokenizer

    bench = "caption encoding, Llama-3-8B-shaped, bf16 (GPU)"
    tokenizer = train_tokenizer(captions, vocab_size=4096, model_max_length=8192)  # random weights: any ids do
    config = {**LLAMA3_8B, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    with torch.device("cuda"):
        model = LlamaModel._from_config(LlamaConfig(**config), dtype=torch.bfloat16).eval()
    encoder = LLMEncoder(model, tokenizer, pooling_mode="mean", max_length=512)
    # The first pass meets every padded length (GEMM shape) for the first time; the second is the timed one.
    one_pass = functools.partial(encoder.encode, captions, batch_size=batch_size, show_progress=False)
    first_pass, seconds = _timed(one_pass, 1), _timed(one_pass, 1)
    lengths = encoder.tokenize(encoder.prepare_texts(captions))["attention_mask"].sum(dim=1).tolist()
    flops = sum(llama_forward_flops(length, **LLAMA3_8B) for length in lengths) / len(captions)
    rows = _mfu_rows(f"{bench}, batch {batch_size}", len(captions) / seconds, flops, "captions/s")
    del one_pass, encoder, model  # free the GPU for llm2vec's copy
    torch.cuda.empty_cache()

    llm2vec_python = llm2vec_python or str(ROOT / ".venv-llm2vec" / "bin" / "python")
    if shutil.which(llm2vec_python) is None:
        return [*rows, Note(bench, "LLMEncoder / llm2vec (captions/s)", f"no llm2vec python at {llm2vec_python}")]
    with tempfile.TemporaryDirectory() as work:
        tokenizer.save_pretrained(work)
        make_tokenizer_portable(Path(work))  # tokenizers 0.19 reads the file
        spec = {"config": config, "tokenizer": work, "eos_token": tokenizer.eos_token, "captions": captions,
                "batch_size": batch_size, "max_length": 512}
        Path(work, "spec.json").write_text(json.dumps(spec))
        done = subprocess.run([llm2vec_python, str(ROOT / "bench" / "llm2vec_gpu_encode.py"), f"{work}/spec.json",
                               f"{work}/result.json"], capture_output=True, text=True)
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(f"llm2vec failed: {last_line}")
        theirs = json.loads(Path(work, "result.json").read_text())
    return [*rows, Ratio(bench, "first pass: LLMEncoder / llm2vec 0.2.3 (captions/s)", len(captions) / first_pass,
                         len(captions) / theirs["first_pass_seconds"], "captions/s"),
            Ratio(bench, "second pass: LLMEncoder / llm2vec 0.2.3 (captions/s)", len(captions) / seconds,
                         len(captions) / theirs["seconds"], "captions/s")]


def _mfu_rows(bench: str, rate: float, flops_per_item: float, unit: str) -> list[Ratio | Note]:
    """The rate as a note, and achieved model FLOP/s over the GPU's peak (the MFU) as a ratio."""
    name = torch.cuda.get_device_name()
    rows: list[Ratio | Note] = [Note(bench, unit, f"{rate:,.1f} {unit} on {name}")]
    peak = peak_bf16_tflops(name)
    if peak is None:
        return [*rows, Note(bench, "MFU", f"no bf16 peak known for {name}")]
    return [*rows, Ratio(bench, "MFU: model FLOP/s / peak bf16", rate * flops_per_item / 1e12, peak, "TFLOP/s")]
