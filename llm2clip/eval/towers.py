"""How each model type turns images and texts into L2-normalised features for evaluation.

`LLM2CLIPTower`: captions go through the stage-1 LLM caption encoder (any length up to its
max_length), then the checkpoint's text adapter. `CLIPTower`: a plain `CLIPModel` with its own text
transformer, whose captions are cut to its position limit (77 tokens), as CLIP does.
`load_tower` picks the class from the checkpoint's config.json.
"""

from __future__ import annotations

import json
import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL.Image import Image
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from llm2clip.clip.modeling_llm2clip import clip_image_processor
from llm2clip.errors import InputError
from llm2clip.weights import require_weights

if TYPE_CHECKING:
    from llm2clip.clip import LLM2CLIPModel
    from llm2clip.text.encoder import LLMEncoder


class ImageTextTower(ABC):
    """Images and texts in, L2-normalised float32 features [N, D] (on the CPU) out."""

    kind: str

    @abstractmethod
    def image_features(self, images: list[Image]) -> torch.Tensor: ...

    @abstractmethod
    def text_features(self, texts: list[str]) -> torch.Tensor: ...


def image_processor(model_dir: Path, image_size: int) -> CLIPImageProcessor:
    """The directory's own processor, else CLIP's: resize the shortest side, centre crop, CLIP mean/std."""
    if (model_dir / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(model_dir)
    return clip_image_processor(image_size)


class LLM2CLIPTower(ImageTextTower):
    kind = "llm2clip"

    def __init__(self, model: LLM2CLIPModel, processor: CLIPImageProcessor, encoder: LLMEncoder, batch_size: int = 64):
        if encoder.embedding_dim != model.config.text_embed_dim:
            raise InputError(
                f"the text encoder gives {encoder.embedding_dim}-dim embeddings but the LLM2CLIP adapter expects "
                f"{model.config.text_embed_dim} (text_embed_dim): is it the encoder the model was trained with?"
            )
        self.model = model.eval()
        self.processor = processor
        self.encoder = encoder
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: list[Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.model.get_image_features(pixels).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        embeddings = self.encoder.encode(texts, batch_size=self.batch_size)
        chunks = [
            self.model.get_text_features(embeddings[start : start + self.batch_size].to(self.device))
            for start in range(0, len(embeddings), self.batch_size)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1).cpu()


class CLIPTower(ImageTextTower):
    kind = "clip"

    def __init__(self, model: CLIPModel, processor: CLIPImageProcessor, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model.config.text_config.max_position_embeddings  # 77 for CLIP

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: list[Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        # verbose=False: the tokenizer would warn of "indexing errors"; the batches below truncate, and we count.
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        n_cut = sum(length > self.max_length for length in lengths)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(texts)} texts were cut to CLIP's {self.max_length} tokens", stacklevel=3)
        chunks = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="clip text", unit="batch", disable=None):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            chunks.append(out.pooler_output.float())
        return F.normalize(torch.cat(chunks), dim=-1).cpu()


def _recorded_encoder(model_dir: Path, config) -> str | None:
    """The encoder the checkpoint records: its absolute path, else its place relative to the checkpoint (a moved tree)."""
    recorded, relative = config.text_encoder_name_or_path, getattr(config, "text_encoder_relative_path", None)
    if (recorded and Path(recorded).is_dir()) or not relative:
        return recorded
    return str(model_dir / relative)


def load_tower(
    model_dir: str | os.PathLike,
    text_encoder: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> ImageTextTower:
    """The tower for a checkpoint directory: LLM2CLIP ("llm2clip") or a plain CLIPModel ("clip").

    An LLM2CLIP model needs its LLM caption encoder: `text_encoder`, else the checkpoint config's
    `text_encoder_name_or_path` (where that is gone: `text_encoder_relative_path`, from `model_dir`). It must
    be the encoder the model was trained on (same fingerprint), and it embeds with the pooling and max length
    the training cache used.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise InputError(f"{model_dir}: no config.json; expected an LLM2CLIP or CLIP checkpoint directory")
    model_type = json.loads(config_file.read_text()).get("model_type")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model_type == "llm2clip":
        from llm2clip.clip import LLM2CLIPModel
        from llm2clip.embed import weight_hash
        from llm2clip.text.encoder import LLMEncoder

        require_weights(model_dir)
        model = LLM2CLIPModel.from_pretrained(model_dir).to(device)
        text_encoder = text_encoder or _recorded_encoder(model_dir, model.config)
        if not text_encoder:
            raise InputError(f"{model_dir}: the config names no text encoder (text_encoder_name_or_path); "
                             "give the LLM caption encoder directory with text_encoder=DIR")
        if not Path(text_encoder).is_dir():
            raise InputError(f"{model_dir}: text encoder directory not found: {text_encoder}")
        trained_on = model.config.text_encoder_fingerprint
        if trained_on is not None and (found := weight_hash(text_encoder)) != trained_on:
            raise InputError(f"{model_dir} was trained on the embeddings of an encoder with fingerprint "
                             f"{trained_on[:12]} ({model.config.text_encoder_name_or_path}), but {text_encoder} has "
                             f"{found[:12]} (other weights or settings); give that encoder with text_encoder=DIR")
        encoder = LLMEncoder.from_pretrained(text_encoder, device=device,
                                             pooling_mode=model.config.text_encoder_pooling_mode,
                                             max_length=model.config.text_encoder_max_length)
        processor = image_processor(model_dir, model.config.vision_config.image_size)
        return LLM2CLIPTower(model, processor, encoder, batch_size)
    if model_type == "clip":
        require_weights(model_dir)
        model = CLIPModel.from_pretrained(model_dir).to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load the CLIP tokenizer from {model_dir}: {err}") from err
        processor = image_processor(model_dir, model.config.vision_config.image_size)
        return CLIPTower(model, processor, tokenizer, batch_size)
    raise InputError(f"{model_dir}: model_type {model_type!r} cannot be evaluated; expected 'llm2clip' or 'clip'")
