"""Half precision on a GPU: the stage-2 model and the caption encoder agree with fp32 (skipped without CUDA).

These run where a CUDA GPU is present (`pytest tests/test_gpu.py`); CI machines have none and skip them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from llm2clip import LLM2CLIPConfig, LLM2CLIPModel, LLMEncoder
from llm2clip.text.tokenizer_training import train_tokenizer
from llm2clip.training import native_bf16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
          "patch_size": 8, "image_size": 64}
# The paper's adapter design (input L2 norm, 2x hidden, LayerNorm, Linear with bias) at a small size.
ADAPTER = {"text_embed_dim": 256, "adapter_depth": 4, "adapter_hidden_dim": 512, "projection_dim": 128,
           "adapter_input_l2norm": True, "text_projection_bias": True}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().flatten(start_dim=1), b.float().flatten(start_dim=1))


def test_auto_precision_is_bf16_on_a_bf16_gpu():
    assert native_bf16() == torch.cuda.is_bf16_supported()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stage2_loss_and_gradients_under_autocast_match_fp32(dtype):
    torch.manual_seed(0)
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=VISION, **ADAPTER)).cuda().train()
    pixels = torch.randn(32, 3, 64, 64, device="cuda")
    captions = torch.randn(32, ADAPTER["text_embed_dim"], device="cuda")

    reference = model(pixels, captions, return_loss=True).loss
    reference.backward()
    reference_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        loss = model(pixels, captions, return_loss=True).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]

    assert loss.dtype == torch.float32  # the loss is reduced in fp32 under autocast
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=2e-2)
    assert len(grads) == len(reference_grads)
    flat, flat_reference = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference_grads])
    assert torch.isfinite(flat).all()
    assert cosine(flat[None], flat_reference[None]).item() > 0.99


def test_bf16_caption_embeddings_on_the_gpu_match_fp32_on_the_cpu():
    captions = [f"a {size} {colour} {shape} left of a {colour} circle on a dark background"
                for size in ("small", "large") for colour in ("red", "blue", "green") for shape in ("star", "box")]
    tokenizer = train_tokenizer(captions, vocab_size=256, model_max_length=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    reference = LLMEncoder(model, tokenizer).encode(captions, batch_size=5, show_progress=False)
    encoder = LLMEncoder(model.to("cuda", torch.bfloat16), tokenizer)
    embeddings = encoder.encode(captions, batch_size=5, show_progress=False)

    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert (cosine(embeddings, reference) > 0.995).all()
