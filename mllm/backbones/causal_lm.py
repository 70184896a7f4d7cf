"""Decoder LLMs loaded with `AutoModelForCausalLM` (Llama, Vicuna, Mistral, Qwen, the tiny LLM, ...)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm2clip.errors import InputError
from llm2clip.weights import require_weights
from mllm.backbones.base import LanguageBackbone, LanguageParts


class CausalLMBackbone(LanguageBackbone):
    name = "causal_lm"

    def load(self, path: Path, dtype: torch.dtype) -> LanguageParts:
        if not (path / "config.json").is_file():
            raise InputError(f"LLM {path} has no config.json")
        require_weights(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a causal LM and its tokenizer from {path}: {err}") from None
        if not tokenizer.is_fast:
            raise InputError(f"the tokenizer of {path} is not a fast (tokenizers) one; label masking needs its offsets")
        return LanguageParts(model, tokenizer)
