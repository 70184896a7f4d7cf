"""The small interface between the LLaVA builder and the models it assembles.

A backbone turns a local directory into the modules a `LlavaForConditionalGeneration` holds. Each
module must be the class that `AutoModel.from_config` builds from its config, because that is how a
plain HF Llava checkpoint rebuilds it on loading. A new kind of tower or LLM is one new file holding
one subclass, registered by name in `mllm.backbones`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import BaseImageProcessor, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class VisionParts:
    model: PreTrainedModel  # called with pixel_values; LLaVA reads its hidden_states
    image_processor: BaseImageProcessor  # pads to a square with its mean colour, then resizes, crops, normalises
    patch_size: int
    num_additional_tokens: int  # tokens the tower puts before its patch tokens (CLIP: the class token)


@dataclass
class LanguageParts:
    model: PreTrainedModel  # a causal LM: get_decoder() and get_output_embeddings() go into the Llava
    tokenizer: PreTrainedTokenizerBase  # a fast tokenizer (label masking reads its offsets)


class VisionBackbone(ABC):
    name: ClassVar[str]

    @abstractmethod
    def load(self, path: Path, dtype: torch.dtype) -> VisionParts:
        """The tower and its image processor from a local directory; InputError if it is not one."""


class LanguageBackbone(ABC):
    name: ClassVar[str]

    @abstractmethod
    def load(self, path: Path, dtype: torch.dtype) -> LanguageParts:
        """The LLM and its tokenizer from a local directory; InputError if it is not one."""
