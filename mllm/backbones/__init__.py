"""Backbones by name: the config keys `vision_backbone` and `language_backbone` pick one."""

from __future__ import annotations

from llm2clip.errors import InputError
from mllm.backbones.base import LanguageBackbone, LanguageParts, VisionBackbone, VisionParts
from mllm.backbones.causal_lm import CausalLMBackbone
from mllm.backbones.clip_vision import CLIPVisionBackbone

VISION_BACKBONES: dict[str, type[VisionBackbone]] = {CLIPVisionBackbone.name: CLIPVisionBackbone}
LANGUAGE_BACKBONES: dict[str, type[LanguageBackbone]] = {CausalLMBackbone.name: CausalLMBackbone}


def vision_backbone(name: str) -> VisionBackbone:
    if name not in VISION_BACKBONES:
        raise InputError(f"unknown vision backbone {name!r}; known: {', '.join(VISION_BACKBONES)}")
    return VISION_BACKBONES[name]()


def language_backbone(name: str) -> LanguageBackbone:
    if name not in LANGUAGE_BACKBONES:
        raise InputError(f"unknown language backbone {name!r}; known: {', '.join(LANGUAGE_BACKBONES)}")
    return LANGUAGE_BACKBONES[name]()


__all__ = ["LanguageBackbone", "LanguageParts", "VisionBackbone", "VisionParts", "language_backbone",
           "vision_backbone"]
