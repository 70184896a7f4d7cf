"""A model directory with config.json but no weights: every command that loads one says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import (
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
)

from llm2clip import cli as llm2clip_cli
from llm2clip.clip import LLM2CLIPConfig
from llm2clip.errors import InputError
from llm2clip.weights import require_weights
from mllm import cli as mllm_cli

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}
TINY_LLAMA = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2}
PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
             "crop_size": {"height": 32, "width": 32}}


def config_only(folder: Path, config) -> Path:
    """A directory holding `config` as config.json (and a CLIP image processor), without any weights."""
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return folder


def commands(tmp: Path) -> dict[str, tuple]:
    """name -> (console main, argv, the directory without weights)."""
    llama = config_only(tmp / "llama", LlamaConfig(**TINY_LLAMA))
    tower = config_only(tmp / "tower", CLIPVisionConfig(**TINY_VISION))
    clip = config_only(tmp / "clip", CLIPConfig(vision_config=TINY_VISION))
    llm2clip = config_only(tmp / "llm2clip", LLM2CLIPConfig(vision_config=TINY_VISION, text_embed_dim=32))
    llava = config_only(tmp / "llava", LlavaConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                                                   text_config=LlamaConfig(**TINY_LLAMA)))
    texts = tmp / "texts.txt"
    texts.write_text("a red circle\n")
    out = f"out_dir={tmp / 'out'}"
    return {
        "encode": (llm2clip_cli.main, ["encode", "--model", str(llama), str(texts), f"out={tmp / 'x.npy'}"], llama),
        "mntp": (llm2clip_cli.main, ["stage1", "mntp", "--model", str(llama), out], llama),
        "eval llm2clip": (llm2clip_cli.main, ["eval", "--models", str(llm2clip), "--text-encoder", str(llama), out],
                          llm2clip),
        "eval clip": (llm2clip_cli.main, ["eval", "--models", str(clip), out], clip),
        "stage2 tower": (llm2clip_cli.main, ["stage2", f"vision.pretrained={tower}", "encoder=null", out], tower),
        "stage2 baseline": (llm2clip_cli.main, ["stage2", "--model-type", "clip", f"vision.pretrained={clip}", out],
                            clip),
        "mllm tower": (mllm_cli.main, ["pretrain", "--vision-tower", str(tower), "--llm", str(llama), out], tower),
        "mllm llm": (mllm_cli.main, ["pretrain", "--vision-tower", str(tower), "--llm", str(llama), out], llama),
        "mllm llava": (mllm_cli.main, ["finetune", "--model", str(llava), out], llava),
    }


@pytest.mark.parametrize("name", ["encode", "mntp", "eval llm2clip", "eval clip", "stage2 tower", "stage2 baseline",
                                  "mllm tower", "mllm llm", "mllm llava"])
def test_a_directory_without_weights_is_one_line(tmp_path, capsys, small_world, name):
    main, argv, folder = commands(tmp_path)[name]
    if name == "mllm llm":  # a tower with weights, so that the LLM is the one missing them
        CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "tower")
    if name.startswith(("stage2", "eval")):
        argv += [f"data={small_world}"]
    if name == "mntp":
        argv += [f"--corpus={small_world / 'corpus.txt'}"]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after progress bars of models that did load
    prog = "mllm" if main is mllm_cli.main else "llm2clip"
    assert code == 1 and "Traceback" not in err and last.startswith(f"{prog} {argv[0]}") and ": error: " in last, err
    assert f"{folder}: no weights (none of model.safetensors" in last


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="lists weight files that are missing: model-00002-of-00002.safetensors"):
        require_weights(tmp_path)
