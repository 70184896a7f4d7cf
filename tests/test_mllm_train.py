"""mllm build, pretrain, finetune (full and LoRA), resume, export, reload with from_pretrained and generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_fileio import file_states
from test_mllm_data import make_llm, make_tower, write_world
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llm2clip.config import load_config
from llm2clip.errors import InputError
from mllm import cli
from mllm.builder import BuildSettings, build_llava, save_llava
from mllm.export import ExportConfig, ask, export
from mllm.templates import vicuna_v1
from mllm.data import IGNORE_INDEX, LlavaCollator, LlavaDataset, read_llava_json
from mllm.train import (
    FinetuneConfig,
    FinetuneTrainSettings,
    LlavaTrainer,
    PretrainConfig,
    _arguments,
    answer_loss,
    answer_positions,
    finetune,
    param_groups,
    pretrain,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mllm")
    return {"tower": make_tower(root / "tower"), "llm": make_llm(root / "llm"), "world": write_world(root / "world")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def _settings(parts) -> BuildSettings:
    return BuildSettings(vision_tower=parts["tower"], llm=parts["llm"])


def test_build_saves_a_plain_llava_that_reloads(parts, tmp_path):
    model, processor = build_llava(_settings(parts))
    tokenizer = processor.tokenizer
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    assert config.image_seq_length == 16 and config.text_config.vocab_size == len(tokenizer)
    assert (processor.patch_size, processor.num_additional_image_tokens) == (8, 1)
    assert processor.image_processor.do_pad and processor.chat_template == tokenizer.chat_template
    assert "<|start_header_id|>" in processor.chat_template  # the LLM's own until finetuning picks one
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    assert torch.equal(model.lm_head.weight[:-1], llm.lm_head.weight)
    assert (config.projector_hidden_act, config.multimodal_projector_bias) == ("gelu", True)  # mlp2x_gelu

    out = save_llava(model, processor, tmp_path / "llava")
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    reprocessor = AutoProcessor.from_pretrained(out)
    with Image.open(parts["world"] / "images" / "1.png") as image:
        inputs = reprocessor(text="<image>\nWhat color?", images=image, return_tensors="pt")
    assert (inputs.input_ids == config.image_token_id).sum() == 16
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reloaded(**inputs).logits, atol=1e-5)


def test_build_takes_a_full_clip_checkpoint(parts, tmp_path):
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    text = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        (parts["tower"] / "preprocessor_config.json").read_text())
    model, _ = build_llava(BuildSettings(vision_tower=tmp_path / "clip", llm=parts["llm"]))
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)


def test_build_errors_are_named(parts, tmp_path):
    with pytest.raises(InputError, match="has model_type 'llama'; the clip backbone takes"):
        build_llava(BuildSettings(vision_tower=parts["llm"], llm=parts["llm"]))
    with pytest.raises(InputError, match="LLM .* has no config.json"):
        build_llava(BuildSettings(vision_tower=parts["tower"], llm=tmp_path))
    with pytest.raises(InputError, match="vision_feature_layer 3 is outside the tower's 3 hidden states"):
        build_llava(BuildSettings(vision_tower=parts["tower"], llm=parts["llm"], vision_feature_layer=3))
    with pytest.raises(InputError, match="unknown vision backbone 'siglip'; known: clip"):
        build_llava(BuildSettings(vision_tower=parts["tower"], llm=parts["llm"], vision_backbone="siglip"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((parts["tower"] / "config.json").read_text())
    with pytest.raises(InputError, match="has no preprocessor_config.json"):
        build_llava(BuildSettings(vision_tower=bare, llm=parts["llm"]))


def test_param_groups_give_the_tower_and_the_projector_their_own_rates(parts):
    model, _ = build_llava(_settings(parts))
    groups = param_groups(model, weight_decay=0.1, vision_lr=1e-5, projector_lr=3e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        parts_in = {"tower" if names[id(p)].startswith("model.vision_tower.") else
                    "projector" if names[id(p)].startswith("model.multi_modal_projector.") else "llm"
                    for p in group["params"]}
        assert len(parts_in) == 1
        assert group.get("lr") == {"tower": 1e-5, "projector": 3e-3, "llm": None}[parts_in.pop()]
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all("lr" not in g for g in param_groups(model, weight_decay=0.0, vision_lr=None))


def test_training_loss_is_the_models_own_with_logits_only_at_the_answers(parts, tmp_path):
    """The LM head runs only where a next token is learned; loss and gradients are the model's own."""
    model, processor = build_llava(_settings(parts))
    samples, _ = read_llava_json(parts["world"] / "finetune.json", parts["world"])
    dataset = LlavaDataset(samples[:3], processor, vicuna_v1(), max_length=512)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    labels = batch["labels"]
    expected = answer_positions(labels)
    assert set(expected.tolist()) == {p for p in range(labels.shape[1] - 1) if (labels[:, p + 1] != IGNORE_INDEX).any()}
    assert len(expected) < labels.shape[1] / 2

    reference = model(**{k: v for k, v in batch.items() if k != "truncated"})
    reference.loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    trainer = LlavaTrainer(model=model, args=_arguments(FinetuneTrainSettings(), tmp_path, 1.0), train_dataset=dataset,
                           data_collator=LlavaCollator(processor.tokenizer.pad_token_id), processing_class=processor,
                           compute_loss_func=answer_loss)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == (3, len(expected))  # not one row per token
    assert torch.allclose(loss, reference.loss, atol=1e-6)
    loss.backward()
    for name, grad in reference_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name
    assert trainer.truncated == 0


def _pretrain(parts, out: Path, *overrides: str) -> dict:
    config = load_config(PretrainConfig, None, [
        f"model.vision_tower={parts['tower']}", f"model.llm={parts['llm']}",
        f"data.path={parts['world']}/pretrain.json", f"data.image_folder={parts['world']}", f"out_dir={out}",
        "train.batch_size=4", "train.logging_steps=1", "train.save_steps=2", *overrides])
    return pretrain(config)


def _finetune(parts, model: Path, out: Path, *overrides: str) -> dict:
    config = load_config(FinetuneConfig, None, [
        f"model={model}", f"data.path={parts['world']}/finetune.json", f"data.image_folder={parts['world']}",
        f"out_dir={out}", "train.batch_size=4", "train.logging_steps=1", "train.save_steps=2",
        "train.learning_rate=1e-3", *overrides])
    return finetune(config)


@pytest.mark.slow
def test_pretrain_finetune_export_generate(parts, tmp_path):
    report = _pretrain(parts, tmp_path / "pre", "train.max_steps=2")
    pre = tmp_path / "pre" / "final"
    assert report["steps"] == 2 and report["samples"] == 8 and report["trainable_parameters"] == 32 * 32 * 2 + 64
    weights, llm = _weights(pre), LlamaForCausalLM.from_pretrained(parts["llm"]).state_dict()
    assert torch.equal(weights["model.language_model.layers.0.mlp.up_proj.weight"],
                       llm["model.layers.0.mlp.up_proj.weight"])  # frozen: only the projector trained
    assert json.loads((tmp_path / "pre" / "train_report.json").read_text())["loss_curve"]

    # 9 samples in batches of 4: two image batches, then the text-only sample alone (the blank-image path).
    report = _finetune(parts, pre, tmp_path / "ft", "train.max_steps=3", "data.system_prompt=")
    ft = tmp_path / "ft" / "final"
    assert report["steps"] == 3 and report["samples"] == 9 and report["truncated"] == 0
    tuned = _weights(ft)
    assert torch.equal(tuned["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       weights["model.vision_tower.encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(tuned["model.language_model.layers.0.mlp.up_proj.weight"],
                           weights["model.language_model.layers.0.mlp.up_proj.weight"])
    assert (ft / "chat_template.jinja").read_text() == vicuna_v1("")

    question = "What color is the star?"
    result = export(ExportConfig(model=ft, out_dir=tmp_path / "llava", image=parts["world"] / "images" / "2.png",
                                 question=question, max_new_tokens=4))
    assert sorted(p.name for p in (tmp_path / "llava").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                                     tokenize=False, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{question} ASSISTANT:"  # what lmms-eval's llava_hf renders
    with Image.open(parts["world"] / "images" / "2.png") as image:
        answer = ask(model, processor, image.convert("RGB"), question, max_new_tokens=4)
    assert isinstance(answer, str) and answer == result["answer"]


def test_resume_restores_the_checkpoint_weights(parts, tmp_path):
    """A run stopped after step 1 and rerun ends with the same weights as the run that was never stopped."""
    out = tmp_path / "pre"
    settings = ("train.max_steps=2", "train.save_steps=1", "train.save_total_limit=3", "train.warmup_ratio=0")
    _pretrain(parts, out, *settings)
    uninterrupted = _weights(out / "final")
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    shutil.rmtree(out / "final")  # as if killed during step 2

    report = _pretrain(parts, out, *settings)
    assert (report["resumed_from_step"], report["steps_this_run"]) == (1, 1)
    resumed = _weights(out / "final")
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(resumed[projector], _weights(out / "checkpoints" / "checkpoint-1")[projector])
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)

    before = file_states(out)
    assert _pretrain(parts, out, *settings) == report  # a finished run reruns as a no-op
    assert file_states(out) == before


def test_rerun_of_a_finished_pretrain_changes_nothing(parts, tmp_path, capsys):
    out = tmp_path / "pre"
    first = _pretrain(parts, out, "train.max_steps=2")  # 8 samples in batches of 4: one epoch
    before = file_states(out)
    capsys.readouterr()

    assert _pretrain(parts, out, "train.max_steps=2") == first
    assert capsys.readouterr().out.strip() == f"mllm pretrain: already finished (2 steps) in {out}; nothing to do"
    assert file_states(out) == before

    second = _pretrain(parts, out, "train.max_steps=3")
    assert (second["resumed_from_step"], second["steps_this_run"], second["steps"]) == (2, 1, 3)
    assert second["train_runtime_s"] == pytest.approx(first["train_runtime_s"] + second["runtime_this_run_s"],
                                                      abs=0.11)


@pytest.mark.slow
def test_lora_finetune_with_a_trained_tower_resumes_and_exports_merged(parts, tmp_path):
    _pretrain(parts, tmp_path / "pre", "train.max_steps=1")
    pre = tmp_path / "pre" / "final"
    lora = ["tune=lora", "lora.r=4", "lora.alpha=8", "vision_lr=1e-3", "data.template=llm", "data.max_samples=8",
            "train.gradient_checkpointing=true"]
    first = _finetune(parts, pre, tmp_path / "ft", "train.max_steps=2", *lora)
    assert first["steps"] == 2 and (tmp_path / "ft" / "checkpoints" / "checkpoint-2" / "adapter_config.json").is_file()
    again = _finetune(parts, pre, tmp_path / "ft", "train.max_steps=3", *lora)
    assert (again["resumed_from_step"], again["steps"], again["steps_this_run"]) == (2, 3, 1)
    assert (tmp_path / "ft" / "final" / "adapter_model.safetensors").is_file()

    result = export(ExportConfig(model=tmp_path / "ft" / "final", out_dir=tmp_path / "llava", image=None))
    assert "answer" not in result
    files = [load_file(path / "model.safetensors") for path in (tmp_path / "llava", pre)]
    assert set(files[0]) == set(files[1])  # a plain Llava: no LoRA or wrapper weights left
    merged, base = _weights(tmp_path / "llava"), _weights(pre)
    for name in ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                 "model.language_model.layers.0.self_attn.q_proj.weight",
                 "model.language_model.layers.0.mlp.up_proj.weight", "model.multi_modal_projector.linear_1.weight"):
        assert not torch.equal(merged[name], base[name]), name  # the tower, LoRA merged, the projector
    embeddings = "model.language_model.embed_tokens.weight"
    assert torch.equal(merged[embeddings], base[embeddings])


def test_training_input_errors(parts, tmp_path):
    with pytest.raises(InputError, match="is not a Llava checkpoint directory"):
        _finetune(parts, parts["llm"], tmp_path / "ft")
    with pytest.raises(InputError, match="vision_lr must be positive"):
        _finetune(parts, parts["llm"], tmp_path / "ft", "vision_lr=0")
    with pytest.raises(InputError, match="projector_lr must be positive"):
        _finetune(parts, parts["llm"], tmp_path / "ft", "projector_lr=-1")
    with pytest.raises(InputError, match="LLaVA data file not found"):
        _pretrain(parts, tmp_path / "pre", "data.path=/no/such.json")
    with pytest.raises(InputError, match="adapter in .* was trained on '/gone'"):
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone"}))
        export(ExportConfig(model=tmp_path / "adapter", out_dir=tmp_path / "out", image=None))


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_mllm_cli_lets_idle_openmp_threads_sleep_unless_told_otherwise(given, expected):
    """Set before torch loads OpenMP, which reads it once; a policy in the environment is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    result = subprocess.run([sys.executable, "-c", POLICY_WHEN_TORCH_LOADS], env=env, cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == [expected, expected]


# Prints OMP_WAIT_POLICY as it is when `import mllm.cli` first imports torch (`import llm2clip` does), then after.
POLICY_WHEN_TORCH_LOADS = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
import mllm.cli
print(seen[0] if seen else "torch-not-loaded", os.environ.get("OMP_WAIT_POLICY"))
"""


def test_cli_prints_configs_and_one_line_errors(tmp_path, capsys):
    assert cli.main(["finetune", "--print-config", "--tune", "lora"]) == 0
    printed = capsys.readouterr().out
    assert "tune: lora" in printed and "learning_rate: 2.0e-05" in printed
    assert cli.main(["export", "--model", str(tmp_path), "image=null"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"mllm export: error: {tmp_path} is not a Llava checkpoint directory (config.json model_type: None)")


@pytest.mark.parametrize("name, config_cls", [
    ("tiny-llava-pretrain.yaml", PretrainConfig), ("tiny-llava-finetune.yaml", FinetuneConfig),
    ("llava-1.5-7b-pretrain.yaml", PretrainConfig), ("llava-1.5-7b-finetune.yaml", FinetuneConfig),
])
def test_shipped_configs_load(name, config_cls):
    config = load_config(config_cls, ROOT / "configs" / name)
    if name == "tiny-llava-pretrain.yaml":
        assert config == config_cls()  # spells out the embedded defaults
    elif name == "tiny-llava-finetune.yaml":  # the embedded defaults with a rate, size and prompt for the tiny LLM
        defaults = config_cls()
        assert config.train.learning_rate > defaults.train.learning_rate and config.data.system_prompt == ""
        assert replace(config, train=replace(config.train, learning_rate=defaults.train.learning_rate),
                       data=replace(config.data, max_samples=defaults.data.max_samples, system_prompt=None)) == defaults
    else:
        assert config.train.deepspeed.startswith("configs/deepspeed/zero") and config.train.gradient_checkpointing
