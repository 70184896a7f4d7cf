"""Rewrite what transformers 5 saves so that transformers 4.44 / tokenizers 0.19 (llm2vec's pins) read it the same.

Both rewrites work in place on a saved model directory and leave files that transformers 5 still reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_config_portable(folder: Path, model_name: str = "") -> None:
    """config.json: the name llm2vec picks its prompt template by, and rope settings under the 4.x keys."""
    path = folder / "config.json"
    if not path.is_file():
        return
    config = _read(path)
    if model_name:
        config["_name_or_path"] = model_name  # transformers 5 drops it
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = extra if extra.get("rope_type", "default") != "default" else None
    _write(path, config)


def make_tokenizer_portable(folder: Path) -> None:
    """tokenizer.json merges as "left right" strings; tokenizer_config.json with the class and keys 4.x knows."""
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = _read(config_path)
        if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for the fast tokenizer
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # Otherwise transformers 4 returns token_type_ids, which decoder models reject.
        config["model_input_names"] = ["input_ids", "attention_mask"]
        extra = config.get("extra_special_tokens")
        if isinstance(extra, list) and "additional_special_tokens" not in config:
            config["additional_special_tokens"] = extra  # transformers 5's name for them
        for key in ("is_local", "local_files_only"):  # loading state that from_pretrained leaves behind
            config.pop(key, None)
        _write(config_path, config)
    path = folder / "tokenizer.json"
    if path.is_file():
        tokenizer = _read(path)
        merges = tokenizer.get("model", {}).get("merges")
        # tokenizers < 0.20 reads BPE merges only as "left right" strings, so no part may hold a space.
        if merges and all(isinstance(m, list) and not any(" " in part for part in m) for m in merges):
            tokenizer["model"]["merges"] = [" ".join(m) for m in merges]
            _write(path, tokenizer)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
