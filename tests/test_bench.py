"""bench/: the GPU benches' FLOP counts (checked on CPU against torch's FlopCounterMode) and the ratio table."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlamaModel

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
from table import Note, Ratio, format_table  # noqa: E402

VIT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
       "image_size": 40}
ADAPTER = {"text_embed_dim": 24, "adapter_depth": 3, "adapter_hidden_dim": 40, "projection_dim": 16}
LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 2}


def counted(run) -> int:
    """FLOPs that torch counts (eager attention: the CPU's fused SDPA kernel is not counted)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def test_vit_and_adapter_flops_match_torchs_count():
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=CLIPVisionConfig(**VIT), **ADAPTER)).eval()
    model.set_attn_implementation("eager")
    batch = 3
    images = counted(lambda: model.get_image_features(torch.randn(batch, 3, 40, 40)))
    assert images == batch * gpu.vit_forward_flops(**VIT, projection_dim=16)
    captions = counted(lambda: model.get_text_features(torch.randn(batch, 24)))
    assert captions == batch * gpu.adapter_forward_flops(**ADAPTER)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_llama_flops_match_torchs_count(length):
    model = LlamaModel(LlamaConfig(vocab_size=50, max_position_embeddings=64, **LLAMA)).eval()
    model.set_attn_implementation("eager")
    flops = counted(lambda: model(input_ids=torch.randint(0, 50, (2, length)), is_causal=False))
    assert flops == 2 * gpu.llama_forward_flops(length, **LLAMA)


def test_the_paper_shapes_give_the_known_sizes():
    # ViT-L/14-336, 577 tokens: about 191 G multiply-adds per image forward (2 x 0.3B weights x 577 tokens, plus
    # attention), the figure profilers that count multiply-adds list for it; the paper's adapter: 4 blocks of
    # 2 x 4096 x 8192 weights, then 4096 x 1280.
    assert gpu.vit_forward_flops(**gpu.VIT_L14_336) == pytest.approx(2 * 1.91e11, rel=0.01)
    assert gpu.adapter_forward_flops(**gpu.PAPER_ADAPTER) == 4 * 4 * 4096 * 8192 + 2 * 4096 * 1280


def test_peak_lookup_prefers_the_more_specific_name():
    assert gpu.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_bf16_tflops("Some GPU") is None


def test_the_table_has_one_row_per_ratio_or_note():
    rows = [Ratio("stage 2", "ours / open_clip", 150.0, 100.0, "samples/s"),
            Ratio("llava", "before / after", 5.65, 3.16, "s/step"),
            Note("gpu encoding", "LLMEncoder / llm2vec", "llm2vec is not installed")]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| bench | compared | ratio | numerator | denominator |"
    assert lines[2] == "| stage 2 | ours / open_clip | 1.50x | 150 samples/s | 100 samples/s |"
    assert lines[3] == "| llava | before / after | 1.79x | 5.65 s/step | 3.16 s/step |"
    assert lines[4] == "| gpu encoding | LLMEncoder / llm2vec | - | llm2vec is not installed | |"
    assert len(lines) == 5


def test_run_all_refuses_gpu_without_cuda_and_stays_import_safe():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--gpu"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "--gpu needs CUDA" in done.stderr, done.stderr[-2000:]
