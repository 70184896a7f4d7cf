"""`llm2clip export`: an LLM2CLIP checkpoint's image tower for other libraries.

Formats:
    clip_vision  a plain `CLIPVisionModel` directory with its image processor: transformers, LLaVA-1.5
                 (`mm_vision_tower` set to the directory, `mm_vision_select_layer` -2, patch tokens) and `mllm`
    open_clip    `open_clip_config.json` + `open_clip_model.safetensors`, loaded strictly by
                 `open_clip.create_model_and_transforms("local-dir:DIR")`; `encode_image` gives this model's
                 image features. open_clip models always carry a text tower: this one is a 1-layer placeholder
                 with zero weights (LLM2CLIP's text side is the LLM caption encoder and the adapter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llm2clip.clip import LLM2CLIPModel, export_vision_tower
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from llm2clip.interop.openclip_layout import open_clip_vision_cfg, to_open_clip

# The smallest text tower open_clip builds; its weights are zeros and unused.
PLACEHOLDER_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


@dataclass
class ExportConfig:
    model: Path = Path("runs/stage2/llm2clip/final")  # an LLM2CLIP checkpoint directory
    format: Literal["clip_vision", "open_clip"] = "clip_vision"
    out_dir: Path = Path("runs/export/vision_tower")
    image_size: int | None = None  # clip_vision: resize the shortest side to this (default: the tower's size)


def export(config: ExportConfig) -> Path:
    model_dir = Path(config.model)
    config_file = model_dir / "config.json"
    kind = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if kind != "llm2clip":
        raise InputError(f"{model_dir} is not an LLM2CLIP checkpoint (config.json model_type: {kind!r})")
    model = LLM2CLIPModel.from_pretrained(model_dir, dtype=torch.float32)
    if config.format == "clip_vision":
        out = export_vision_tower(model, config.out_dir, image_size=config.image_size)
    else:
        out = export_open_clip(model, Path(config.out_dir))
    print(f"export: {config.format} image tower of {model_dir} -> {out}")
    return out


def export_open_clip(model: LLM2CLIPModel, out_dir: Path) -> Path:
    try:
        import open_clip
    except ImportError:
        raise InputError("the open_clip format needs open_clip (pip install 'llm2clip[bench]')") from None
    vision_config = model.config.vision_config
    vision_cfg, quick_gelu = open_clip_vision_cfg(vision_config)
    open_clip_config = {
        "model_cfg": {"embed_dim": model.config.projection_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg,
                      "text_cfg": PLACEHOLDER_TEXT_CFG},
        "preprocess_cfg": {"size": vision_config.image_size, "mean": list(OPENAI_CLIP_MEAN),
                           "std": list(OPENAI_CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    visual = to_open_clip(model.vision_model.state_dict(), model.visual_projection.weight.detach(),
                          vision_config.num_hidden_layers)
    with atomic_dir(out_dir) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2))
        # open_clip builds the model from the config (weights are not there yet): its own names and shapes.
        shell = open_clip.create_model(f"local-dir:{tmp}", load_weights=False)
        shell.visual.load_state_dict(visual, strict=True)
        state = {}
        for key, value in shell.state_dict().items():
            state[key] = value if key.startswith("visual.") else torch.zeros_like(value)
        state["logit_scale"] = model.logit_scale.detach().reshape(state["logit_scale"].shape).clone()
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "open_clip_model.safetensors")
    return out_dir
