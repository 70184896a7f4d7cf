"""`--dry-run` of every real-scale config on the meta device, and the same configs cut down for one real step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_mllm_data import CORPUS
from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers import LlamaForCausalLM, LlavaConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llm2clip import cli
from llm2clip.config import load_config
from llm2clip.dryrun import report
from llm2clip.dryrun_plans import plan_contrastive, plan_embed, plan_mntp, plan_stage2
from llm2clip.embed.build import EmbedConfig, build_cache
from llm2clip.stage2.train import Stage2Config, train_stage2
from llm2clip.text.contrastive import ContrastiveConfig, train_contrastive
from llm2clip.text.mntp import MNTPConfig, train_mntp
from llm2clip.text.tokenizer_training import train_tokenizer
from mllm.dryrun_plans import plan_finetune, plan_pretrain
from mllm.train import FinetuneConfig, PretrainConfig, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# The published hyper-parameters of the real models.
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009)
VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L14_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    patch_size=14, image_size=336, projection_dim=768)


@pytest.fixture(scope="module")
def real_configs(tmp_path_factory) -> dict[str, Path]:
    """config.json alone for each real model (the weights are absent on this machine)."""
    root = tmp_path_factory.mktemp("real")
    clip = CLIPVisionConfig(**CLIP_L14_336)
    made = {"llama3": LlamaConfig(**LLAMA3_8B), "vicuna": LlamaConfig(**VICUNA_7B),
            "clip": CLIPConfig(vision_config=clip.to_dict(), projection_dim=768),
            "llava": LlavaConfig(vision_config=clip, text_config=LlamaConfig(**{**VICUNA_7B, "vocab_size": 32001}),
                                 image_seq_length=576, projector_hidden_act="gelu")}
    for name, config in made.items():
        config.save_pretrained(root / name)
    return {name: root / name for name in made}


def _plan(plan, config_cls, yaml: str, *overrides: str) -> dict:
    return report(plan(load_config(config_cls, CONFIGS / yaml, overrides)), gpus=8)


def test_real_configs_build_the_papers_shapes_on_meta(real_configs, capsys):
    for plan, cls, yaml in ((plan_mntp, MNTPConfig, "llama3-8b-stage1-mntp.yaml"),
                            (plan_contrastive, ContrastiveConfig, "llama3-8b-stage1-contrastive.yaml"),
                            (plan_embed, EmbedConfig, "llama3-8b-embed.yaml")):
        result = _plan(plan, cls, yaml, f"model={real_configs['llama3']}")
        assert result["facts"] == {"hidden_size": 4096, "layers": 32, "heads": 32, "kv_heads": 8,
                                   "vocab_size": 128256, "rope_theta": 500000.0}
        if cls is EmbedConfig:
            assert result["trainable"] == 0 and result["total"] == 7_504_924_672  # Llama-3-8B without its head
        else:
            assert 0 < result["trainable"] < 50e6 and set(result["memory_gib"]) == {2, 3}
    assert _plan(plan_mntp, MNTPConfig, "llama3-8b-stage1-mntp.yaml", f"model={real_configs['llama3']}")[
        "total"] - 41_943_040 == 8_030_261_248  # Llama-3-8B plus LoRA r 16 on every projection

    stage2 = _plan(plan_stage2, Stage2Config, "clip-l14-336-stage2.yaml", f"vision.pretrained={real_configs['clip']}")
    assert stage2["facts"]["image_tokens"] == 577 and stage2["facts"]["vision_hidden"] == 1024
    assert stage2["facts"]["adapter_parameters"] == 273_769_728  # the paper's adapter, 273.8M
    assert stage2["zero_stage"] == 2 and stage2["memory_gib"][3] < stage2["memory_gib"][2]

    pre = _plan(plan_pretrain, PretrainConfig, "llava-1.5-7b-pretrain.yaml",
                f"model.vision_tower={real_configs['clip']}", f"model.llm={real_configs['vicuna']}")
    full = _plan(plan_finetune, FinetuneConfig, "llava-1.5-7b-finetune.yaml", f"model={real_configs['llava']}")
    for result in (pre, full):
        assert result["facts"]["projector"] == (1024, 4096, 4096) and result["facts"]["image_tokens"] == 576
        assert result["total"] == pytest.approx(7.06e9, abs=0.01e9)  # LLaVA-1.5-7B
    assert pre["trainable"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # the projector alone
    assert full["trainable"] == full["total"] - 303_507_456  # all but the CLIP ViT-L/14-336 tower
    assert full["zero_stage"] == 3
    out = capsys.readouterr().out
    assert "ZeRO-2:" in out and "ZeRO-3:" in out and "577 tokens" in out


def test_cli_dry_run_prints_and_refuses_a_missing_config_json(real_configs, tmp_path, capsys):
    assert cli.main(["stage2", "--config", str(CONFIGS / "clip-l14-336-stage2.yaml"), "--dry-run",
                     f"vision.pretrained={real_configs['clip']}", "--gpus", "16"]) == 0
    assert "memory per GPU at 16 GPUs" in capsys.readouterr().out
    assert cli.main(["stage1", "mntp", "--dry-run", f"model={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip() == (f"llm2clip stage1 mntp: error: model {tmp_path}: no config.json "
                                               "(a dry run reads only the config)")


@pytest.fixture(scope="module")
def cut_down(tmp_path_factory, small_world) -> dict[str, Path]:
    """The real families at toy size: Llama with 4:1 GQA and rope theta 500000; a CLIP ViT at 336 px, patch 14."""
    root = tmp_path_factory.mktemp("cut-down")
    tokenizer = train_tokenizer(CORPUS * 4 + (small_world / "corpus.txt").read_text().splitlines()[:400],
                                vocab_size=400, model_max_length=512)
    llm = LlamaConfig(**{**LLAMA3_8B, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": len(tokenizer),
                         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    LlamaForCausalLM(llm).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(**{**CLIP_L14_336, "hidden_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "intermediate_size": 64})).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(root / "clip")
    return {"root": root, "llm": root / "llm", "clip": root / "clip", "world": small_world}


STEP = ("train.max_steps=1", "train.batch_size=2", "train.precision=fp32", "train.deepspeed=null",
        "train.dataloader_workers=0", "train.save_steps=1", "train.logging_steps=1")


def test_cut_down_real_configs_take_one_real_step_each(cut_down, one_thread):
    root, world = cut_down["root"], cut_down["world"]
    load = lambda cls, yaml, *overrides: load_config(cls, CONFIGS / yaml, [*STEP, *overrides])  # noqa: E731

    train_mntp(load(MNTPConfig, "llama3-8b-stage1-mntp.yaml", f"model={cut_down['llm']}",
                    f"corpus={world / 'corpus.txt'}", f"out_dir={root / 'mntp'}", "max_seq_length=32"))
    train_contrastive(load(ContrastiveConfig, "llama3-8b-stage1-contrastive.yaml", f"model={root / 'mntp/merged'}",
                           f"data={world}", f"corpus={world / 'corpus.txt'}", f"out_dir={root / 'contrastive'}",
                           "plain_text_max_words=20"))
    encoder = root / "contrastive/merged"
    assert json.loads((encoder / "config.json").read_text())["num_key_value_heads"] == 1
    build_cache(load_config(EmbedConfig, CONFIGS / "llama3-8b-embed.yaml",
                            [f"model={encoder}", f"data={world}", f"out_dir={root / 'cache'}", "batch_size=8"]))
    report2 = train_stage2(load(Stage2Config, "clip-l14-336-stage2.yaml", f"data={world}", "shards=null",
                                f"cache={root / 'cache'}", f"encoder={encoder}", f"vision.pretrained={cut_down['clip']}",
                                "adapter.input_dim=32", "adapter.hidden_dim=64", "projection_dim=16",
                                f"out_dir={root / 'stage2'}", "train.gradient_checkpointing=true"))
    assert report2["steps"] == 1
    pre = pretrain(load(PretrainConfig, "llava-1.5-7b-pretrain.yaml", f"model.vision_tower={root / 'stage2/vision_tower'}",
                        f"model.llm={cut_down['llm']}", f"data.path={world / 'llava/pretrain.json'}",
                        f"data.image_folder={world}", "data.max_samples=8", f"out_dir={root / 'pretrain'}"))
    tuned = finetune(load(FinetuneConfig, "llava-1.5-7b-finetune.yaml", f"model={root / 'pretrain/final'}",
                          f"data.path={world / 'llava/finetune.json'}", f"data.image_folder={world}",
                          "data.max_samples=8", f"out_dir={root / 'finetune'}"))
    assert pre["steps"] == tuned["steps"] == 1
    llava = json.loads((root / "finetune/final/config.json").read_text())
    assert llava["image_seq_length"] == 576 and llava["vision_config"]["image_size"] == 336
