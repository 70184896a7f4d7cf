"""`llm2clip encode`: one text per line in, a float32 [N, D] .npy array out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm2clip.errors import InputError
from llm2clip.fileio import atomic_save_npy


@dataclass
class EncodeConfig:
    model: Path = Path("runs/stage1/contrastive/merged")  # encoder directory (HF or llm2vec layout)
    texts: Path | None = None  # text file, one text per line
    out: Path = Path("runs/encoded.npy")
    instruction: str = ""
    batch_size: int = 32
    adapters: list[str] = field(default_factory=list)  # PEFT adapter directories applied in order
    pooling_mode: str | None = None  # default: the encoder's llm2vec_config.json, else mean
    max_length: int | None = None
    doc_max_length: int | None = None
    model_name: str | None = None  # hub name that picks the prompt template (default: config.json)
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)
    device: str | None = None


def read_texts(path: Path | None) -> list[str]:
    if path is None:
        raise InputError("no text file given (texts=FILE, one text per line)")
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise InputError(f"text file {path} is empty")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}: line {number} is empty")
    return lines


def encode_file(config: EncodeConfig) -> None:
    from llm2clip.text.encoder import LLMEncoder

    texts = read_texts(config.texts)
    encoder = LLMEncoder.from_pretrained(
        config.model,
        config.adapters,
        pooling_mode=config.pooling_mode,
        max_length=config.max_length,
        doc_max_length=config.doc_max_length,
        model_name=config.model_name,
        dtype=config.dtype,
        device=config.device,
    )
    embeddings = encoder.encode(texts, instruction=config.instruction, batch_size=config.batch_size).numpy()
    atomic_save_npy(config.out, embeddings.astype(np.float32))
    print(f"encoded N={embeddings.shape[0]} texts into D={embeddings.shape[1]} dims ({encoder.pooling_mode} pooling)"
          f" -> {config.out}")
