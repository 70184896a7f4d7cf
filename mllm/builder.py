"""Assemble, load and save a plain `LlavaForConditionalGeneration` with its `LlavaProcessor`.

A new model takes a vision tower directory and an LLM directory, read by the backbones named in the
settings, and a freshly initialised 2-layer GELU projector (LLaVA's mlp2x_gelu). The tokenizer gains
the `<image>` token (and a pad token if it has none) and the LLM's embeddings grow to match. The
processor pads images to a square, expands each `<image>` into one token per image feature and
carries a chat template. Saved, the directory loads with `from_pretrained` and no custom code.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from llm2clip.logs import transformers_errors_only
from llm2clip.weights import require_weights
from mllm.backbones import language_backbone, vision_backbone
from mllm.templates import vicuna_v1

IMAGE_TOKEN = "<image>"


@dataclass
class BuildSettings:
    vision_tower: Path = Path("runs/stage2/llm2clip/vision_tower")  # a CLIPVisionModel (or CLIPModel) directory
    llm: Path = Path("runs/tiny-llm")  # a causal LM directory with its tokenizer
    vision_backbone: str = "clip"  # names in mllm.backbones
    language_backbone: str = "causal_lm"
    vision_feature_layer: int = -2  # hidden state of the tower the projector reads (LLaVA-1.5: the penultimate)
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default: patch tokens only (drop CLS)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def build_llava(settings: BuildSettings) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A new Llava from a tower and an LLM, with a fresh projector, and its processor."""
    dtype = getattr(torch, settings.dtype)
    vision = vision_backbone(settings.vision_backbone).load(Path(settings.vision_tower), dtype)
    language = language_backbone(settings.language_backbone).load(Path(settings.llm), dtype)
    tokenizer, lm = language.tokenizer, language.model
    _add_tokens(tokenizer)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        with transformers_errors_only():  # its note that new rows start at the old rows' mean: as intended
            lm.resize_token_embeddings(len(tokenizer))
    lm.config.pad_token_id = tokenizer.pad_token_id

    layers = vision.model.config.num_hidden_layers
    if not -layers - 1 <= settings.vision_feature_layer <= layers:
        raise InputError(f"vision_feature_layer {settings.vision_feature_layer} is outside the tower's "
                         f"{layers + 1} hidden states (-{layers + 1}..{layers})")
    processor = LlavaProcessor(
        image_processor=vision.image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        num_additional_image_tokens=vision.num_additional_tokens,
        chat_template=tokenizer.chat_template or vicuna_v1(),  # finetuning sets the one it trains with
    )
    tokenizer.chat_template = processor.chat_template  # lmms-eval reads the tokenizer's
    config = LlavaConfig(
        vision_config=vision.model.config,
        text_config=lm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_token_count(processor),
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        dtype=dtype,
    )
    # A shell whose tower and LLM are replaced by the loaded ones below: on the meta device, or partitioned by ZeRO-3.
    with contextlib.nullcontext() if is_deepspeed_zero3_enabled() else torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    for name, part in (("vision_tower", vision.model), ("language_model", lm.get_decoder())):
        expected = type(getattr(model.model, name))
        if type(part) is not expected:
            raise InputError(f"the {name} is a {type(part).__name__}, but a Llava checkpoint rebuilds it from its "
                             f"config as a {expected.__name__}; it would not reload")
        setattr(model.model, name, part)
    model.lm_head = lm.get_output_embeddings()
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)  # PyTorch's Linear init, as LLaVA
    model.generation_config = lm.generation_config
    return model, processor


def image_token_count(processor: LlavaProcessor) -> int:
    """How many `<image>` tokens the processor expands one placeholder into (one per projected feature)."""
    crop = processor.image_processor.crop_size
    count = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    count += processor.num_additional_image_tokens
    return count - 1 if processor.vision_feature_select_strategy == "default" else count


def load_llava(path: Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A saved Llava directory (a build, a training output or an export) and its processor."""
    path = Path(path)
    config_file = path / "config.json"
    kind = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if kind != "llava":
        raise InputError(f"{path} is not a Llava checkpoint directory (config.json model_type: {kind!r})")
    require_weights(path)
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype), AutoProcessor.from_pretrained(path)


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: Path) -> Path:
    """Write the model (safetensors) and its processor to `out_dir`, replacing it in one rename."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def _add_tokens(tokenizer) -> None:
    """The `<image>` placeholder as a special token, and a pad token (the unknown token where there is one)."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # keeps its id where the vocabulary has it
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # as LLaVA does for Vicuna
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
