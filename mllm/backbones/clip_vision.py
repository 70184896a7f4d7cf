"""CLIP ViT towers: a `CLIPVisionModel` directory (the stage-2 export) or a full `CLIPModel` one (OpenAI's)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, CLIPVisionModel, LlavaImageProcessor

from llm2clip.errors import InputError
from llm2clip.weights import require_weights
from mllm.backbones.base import VisionBackbone, VisionParts

MODEL_TYPES = ("clip_vision_model", "clip")
PROCESSOR_KEYS = ("size", "crop_size", "resample", "image_mean", "image_std", "do_center_crop", "rescale_factor")


class CLIPVisionBackbone(VisionBackbone):
    name = "clip"

    def load(self, path: Path, dtype: torch.dtype) -> VisionParts:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise InputError(f"vision tower {path} has no config.json")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in MODEL_TYPES:
            raise InputError(f"vision tower {path} has model_type {model_type!r}; the clip backbone takes "
                             f"{' or '.join(MODEL_TYPES)}")
        if not (path / "preprocessor_config.json").is_file():
            raise InputError(f"vision tower {path} has no preprocessor_config.json (its image processor)")
        require_weights(path)
        model = CLIPVisionModel.from_pretrained(path, dtype=dtype)
        source = AutoImageProcessor.from_pretrained(path).to_dict()
        # LLaVA-1.5 pads every image to a square of the mean colour before resizing: do_pad does exactly that.
        processor = LlavaImageProcessor(do_pad=True, **{key: source[key] for key in PROCESSOR_KEYS if key in source})
        crop, size = processor.crop_size, model.config.image_size
        if (crop["height"], crop["width"]) != (size, size):
            raise InputError(f"the image processor of {path} makes {crop['height']}x{crop['width']} images but the "
                             f"tower takes {size}x{size}")
        return VisionParts(model, processor, patch_size=model.config.patch_size, num_additional_tokens=1)
