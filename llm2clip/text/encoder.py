"""A decoder LLM used as a bidirectional text encoder, compatible with llm2vec 0.2.3 checkpoints.

Attention is made bidirectional by transformers' own `is_causal=False` forward argument. Loading
follows llm2vec: a base directory (an adapter stored beside its config is merged into the base
model it names), then optional PEFT adapters, then `llm2vec_config.json` settings, overridden by
explicit arguments. `save_pretrained` writes a layout that llm2vec loads as well.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from llm2clip.logs import transformers_errors_only
from llm2clip.text import pooling
from llm2clip.text.portability import make_config_portable, make_tokenizer_portable
from llm2clip.text.prompts import apply_template, join_instruction, split_instruction, truncate_words
from llm2clip.weights import ADAPTER_WEIGHTS, SAFETENSORS_WEIGHTS, require_weights

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS_FILE = "llm2vec_config.json"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULTS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}


class LLMEncoder(nn.Module):
    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        model_name: str = "",
    ):
        super().__init__()
        _check_settings(pooling_mode, max_length, doc_max_length, skip_instruction)
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.model_name = model_name  # hub name that picks the prompt template (llm2vec's config._name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adapters: Sequence[str | os.PathLike] = (),
        merge_adapters: bool = True,
        *,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        model_name: str | None = None,
    ) -> LLMEncoder:
        """Load an encoder directory (HF or llm2vec layout) and apply `adapters` in order.

        Every adapter but the last is merged; the last one too when `merge_adapters`. `dtype`
        defaults to float32 on CPU and bfloat16 on CUDA. `model_name` overrides the hub name read
        from config.json (`_name_or_path`) that selects the prompt template.
        """
        path = Path(path)
        config = check_supported_model_dir(path)
        adapters = [Path(adapter) for adapter in adapters]
        for adapter in adapters:
            if not (adapter / ADAPTER_CONFIG).is_file():
                raise InputError(f"adapter directory {adapter} has no {ADAPTER_CONFIG}")
            require_weights(adapter, ADAPTER_WEIGHTS)
        settings = dict(DEFAULTS)
        for folder in (path, *adapters):
            settings.update(_read_settings(folder))
        explicit = {"pooling_mode": pooling_mode, "max_length": max_length, "doc_max_length": doc_max_length,
                    "skip_instruction": skip_instruction}
        settings.update({k: v for k, v in explicit.items() if v is not None})
        _check_settings(**settings)  # before any weights are loaded
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a tokenizer from {path}: {err}") from err

        if (path / ADAPTER_CONFIG).is_file():  # llm2vec MNTP layout: base config + adapter, no base weights
            base = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
            model = PeftModel.from_pretrained(_load_base(base, dtype, device, f"{path}/{ADAPTER_CONFIG}"), path)
            model = model.merge_and_unload()
        else:
            model = _load_base(path, dtype, device, str(path))
        for i, adapter in enumerate(adapters):
            model = PeftModel.from_pretrained(model, adapter)
            if merge_adapters or i < len(adapters) - 1:
                model = model.merge_and_unload()
        name = model_name if model_name is not None else config.get("_name_or_path", "")
        return cls(model, tokenizer, **settings, model_name=name)

    def prepare_texts(self, texts: Sequence[str], instruction: str = "") -> list[str]:
        """llm2vec's `_convert_to_str` and `prepare_for_tokenization` for every text."""
        joined, _ = self._join(texts, instruction)
        return [self._template(text) for text in joined]

    def tokenize(self, prepared: Sequence[str]) -> BatchEncoding:
        """input_ids, attention_mask (left-padded) and embed_mask: 1 on the trailing tokens after the separator."""
        pairs = [split_instruction(text) for text in prepared]
        if any(text == full for text, (full, _) in zip(prepared, pairs)):
            raise ValueError("tokenize() takes the output of prepare_texts() (texts with the instruction separator)")
        full, pooled = zip(*pairs) if pairs else ((), ())
        batch = self.tokenizer(list(full), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt", return_token_type_ids=False)
        ids = self.tokenizer(list(pooled), add_special_tokens=False, truncation=True, max_length=self.max_length)
        counts = torch.tensor([len(row) for row in ids["input_ids"]]).unsqueeze(1)
        length = batch["input_ids"].shape[1]
        batch["embed_mask"] = (torch.arange(length) >= length - counts).long()
        return batch

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Pooled float32 embeddings [B, D] of a `tokenize` batch (differentiable)."""
        out = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                         is_causal=False, use_cache=False)
        return self.pool(out.last_hidden_state, features)

    def pool(self, hidden: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        """Pool last hidden states [B, L, D] of a `tokenize` batch into float32 [B, D]."""
        attention_mask = features["attention_mask"]
        if self.skip_instruction:
            if "embed_mask" not in features:
                raise ValueError("skip_instruction needs the embed_mask that tokenize() returns")
            mask = features["embed_mask"]
        else:
            mask = attention_mask
        bos_mask = None
        if self.pooling_mode == "bos_token" and self.tokenizer.bos_token_id is not None:
            bos_mask = (features["input_ids"] == self.tokenizer.bos_token_id) & attention_mask.bool()
        return pooling.pool(hidden, mask, self.pooling_mode, bos_mask)

    def encode(
        self, texts: Sequence[str], instruction: str = "", batch_size: int = 32, show_progress: bool = True
    ) -> Tensor:
        """float32 [N, D] embeddings in input order. Batches are formed by length, as llm2vec does."""
        texts = list(texts)
        if not texts:
            raise InputError("no texts to encode")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text {i} is empty")
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        joined, n_cut = self._join(texts, instruction)
        order = np.argsort([-len(text) for text in joined])
        prepared = [self._template(joined[i]) for i in order]
        # verbose=False: the tokenizer would warn of "indexing errors"; tokenize() truncates, and we warn below.
        lengths = self.tokenizer([split_instruction(text)[0] for text in prepared], verbose=False)["input_ids"]
        n_long = sum(len(row) > self.max_length for row in lengths)
        notes = [f"{n_cut} of {len(texts)} texts were cut word by word to doc_max_length={self.doc_max_length} tokens",
                 f"{n_long} of {len(texts)} texts were truncated to max_length={self.max_length} tokens"]
        if n_cut or n_long:
            warnings.warn("; ".join(note for note, n in zip(notes, (n_cut, n_long)) if n), stacklevel=2)

        was_training = self.training
        self.eval()
        chunks = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(prepared), batch_size), desc="encode", unit="batch",
                              disable=None if show_progress else True):
                features = self.tokenize(prepared[start : start + batch_size]).to(self.device)
                chunks.append(self(features).cpu())
        self.train(was_training)
        sorted_embeddings = torch.cat(chunks)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.from_numpy(order)] = sorted_embeddings
        return embeddings

    def save_pretrained(self, out_dir: str | os.PathLike, merge: bool = True) -> None:
        """Write the llm2vec layout atomically (a full merged model, or only the adapter when merge=False)."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"{out_dir} exists and is not a directory")
        if merge and isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        with atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            make_config_portable(tmp, self.model_name)
            make_tokenizer_portable(tmp)
            settings = {"pooling_mode": self.pooling_mode, "max_length": self.max_length,
                        "doc_max_length": self.doc_max_length, "skip_instruction": self.skip_instruction}
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=4))

    def _join(self, texts: Sequence[str], instruction: str) -> tuple[list[str], int]:
        """Cut long texts and join each with the instruction; returns them and how many were cut."""
        texts, n_cut = truncate_words(texts, self.tokenizer, self.max_length, self.doc_max_length)
        return [join_instruction(instruction, text) for text in texts], n_cut

    def _template(self, text: str) -> str:
        return apply_template(text, self.model_name, self.model.config.model_type, self.pooling_mode,
                              self.tokenizer.eos_token)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def check_supported_model_dir(path: str | os.PathLike) -> dict:
    """The config.json of a model directory whose architecture the encoder supports, and that holds its weights
    (in llm2vec's MNTP layout: an adapter over the base model its adapter_config.json names)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        hint = " (for an adapter directory, pass it in adapters)" if (path / ADAPTER_CONFIG).is_file() else ""
        raise InputError(f"{path} has no config.json{hint}")
    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{path}: unsupported model_type '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    require_weights(path, ADAPTER_WEIGHTS if (path / ADAPTER_CONFIG).is_file() else SAFETENSORS_WEIGHTS)
    return config


def _read_settings(folder: Path) -> dict:
    if not (folder / SETTINGS_FILE).is_file():
        return {}
    settings = _read_json(folder / SETTINGS_FILE)
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise InputError(f"{folder / SETTINGS_FILE}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(DEFAULTS)}")
    return settings


def _check_settings(pooling_mode: str, max_length: int, doc_max_length: int, skip_instruction: bool) -> None:
    if pooling_mode not in pooling.POOLING_MODES:
        raise InputError(f"unknown pooling mode '{pooling_mode}'; use one of {', '.join(pooling.POOLING_MODES)}")
    for key, value in (("max_length", max_length), ("doc_max_length", doc_max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(skip_instruction, bool):
        raise InputError(f"skip_instruction must be true or false, got {skip_instruction!r}")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _load_base(name: str | Path | None, dtype: torch.dtype, device: torch.device, source: str) -> PreTrainedModel:
    """The base transformer without LM head, from safetensors only (never pickle)."""
    if not name:
        raise InputError(f"{source} names no base model")
    if Path(name).is_dir():
        require_weights(name, SAFETENSORS_WEIGHTS)
    try:
        with transformers_errors_only():  # its load report; what matters in it is warned about below
            model, info = AutoModel.from_pretrained(name, dtype=dtype, device_map=str(device), use_safetensors=True,
                                                    output_loading_info=True)
    except OSError as err:
        raise InputError(f"cannot load the model weights '{name}' (from {source}): {err}") from err
    # A causal LM's checkpoint holds an LM head that the encoder, a base model, does not use: expected.
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith("lm_head.")]
    for kind, keys in (("missing", info["missing_keys"]), ("unexpected", unexpected)):  # mismatched ones raise
        if keys:
            warnings.warn(f"{name}: {len(keys)} {kind} weight(s) when loading the encoder, such as {sorted(keys)[0]}",
                          stacklevel=3)
    return model
