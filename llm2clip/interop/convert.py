"""`llm2clip convert`: LLM2CLIP's official releases into this package's layouts, without remote code.

Sources:
    hf_release       a directory of microsoft/LLM2CLIP-Openai-L-14-336 (or -B-16): a CLIPConfig and
                     model.safetensors with vision_model.* (HF CLIP names), visual_projection, text_adapter.*
                     (the paper's adapter, matched by structure) and logit_scale  ->  an LLM2CLIP checkpoint
    eva_checkpoint   a .pt/.bin/.safetensors file of LLM2CLIP's GitHub training code (EVA-CLIP style):
                     visual.* (an OpenAI ViT in open_clip names), text.text_adaptor.{0..5}.*, logit_scale
                     ->  an LLM2CLIP checkpoint (EVA02 towers are refused: open_clip loads those)
    llm2vec_encoder  a directory of microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned (a merged llm2vec Llama
                     published with remote code, any weight-key prefix)  ->  an encoder directory for
                     `llm2clip embed` / `eval`, with the model card's settings (mean pooling, max length 512,
                     the Llama-3-Instruct template)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoImageProcessor, CLIPVisionConfig

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.clip.modeling_llm2clip import clip_image_processor
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from llm2clip.interop.adapter_layout import AdapterShape, match_paper_adapter
from llm2clip.interop.openclip_layout import from_open_clip, vision_config_from_open_clip
from llm2clip.text.encoder import SETTINGS_FILE, check_supported_model_dir

# The model card of LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned: llm2vec with these settings, and the config's
# _name_or_path set to Llama-3-Instruct so that llm2vec picks that chat template.
ENCODER_SETTINGS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 512, "skip_instruction": True}
ENCODER_TEMPLATE_NAME = "meta-llama/Meta-Llama-3-8B-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
EVA_ADAPTER = "text.text_adaptor."


@dataclass
class ConvertConfig:
    source: Literal["hf_release", "eva_checkpoint", "llm2vec_encoder"] = "hf_release"
    checkpoint: Path = Path("models/LLM2CLIP-Openai-L-14-336")  # a directory, or a file for eva_checkpoint
    out_dir: Path = Path("runs/converted")
    encoder: Path | None = None  # the caption encoder the adapter was trained on: width checked, recorded for eval
    head_width: int = 64  # eva_checkpoint: the ViT's attention head width (64 in every OpenAI ViT)
    quick_gelu: bool = True  # eva_checkpoint: OpenAI ViTs use QuickGELU


def convert(config: ConvertConfig) -> Path:
    source = Path(config.checkpoint)
    if not source.exists():
        raise InputError(f"checkpoint not found: {source}")
    if config.source == "llm2vec_encoder":
        out = convert_llm2vec_encoder(source, Path(config.out_dir))
    else:
        if config.source == "hf_release":
            model, processor = _from_hf_release(source, config.encoder)
        else:
            model, processor = _from_eva_checkpoint(source, config)
        with atomic_dir(Path(config.out_dir)) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        out = Path(config.out_dir)
    print(f"convert: {config.source} {source} -> {out}")
    return out


def _from_hf_release(folder: Path, encoder: Path | None):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder}: no config.json; hf_release takes the directory of an LLM2CLIP HF release")
    release = json.loads(config_file.read_text())
    if release.get("model_type") != "clip" or not isinstance(release.get("vision_config"), dict):
        raise InputError(f"{config_file}: model_type {release.get('model_type')!r}; an LLM2CLIP HF release is a "
                         "CLIPConfig ('clip') with a vision_config")
    tensors = read_safetensors(folder)
    adapter = _strip(tensors, "text_adapter.")
    if not adapter:
        raise InputError(f"{folder}: no text_adapter.* weights, so not an LLM2CLIP release (keys like "
                         f"{sorted(tensors)[:4]}); a plain CLIP checkpoint goes in stage 2's vision.pretrained")
    vision = _strip(tensors, "vision_model.")
    known = {"visual_projection.weight", "logit_scale"}
    unknown = sorted(k for k in tensors if k not in known and not k.startswith(("text_adapter.", "vision_model.")))
    if unknown or not known <= set(tensors):
        raise InputError(f"{folder}: not the LLM2CLIP release layout; unexpected keys {unknown[:8]}, "
                         f"missing {sorted(known - set(tensors))}")
    adapter_state, shape = match_paper_adapter(adapter, f"{folder} text_adapter")
    vision_config = CLIPVisionConfig.from_dict(release["vision_config"])
    model = _assemble(vision_config, vision, tensors["visual_projection.weight"], adapter_state, shape,
                      tensors["logit_scale"], encoder, str(folder))
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder)
    else:
        processor = clip_image_processor(vision_config.image_size)
    return model, processor


def _from_eva_checkpoint(path: Path, config: ConvertConfig):
    state = read_state_file(path)
    adapter = _strip(state, EVA_ADAPTER)
    visual = _strip(state, "visual.")
    if not adapter:
        raise InputError(f"{path}: no {EVA_ADAPTER}* weights, so not an LLM2CLIP training checkpoint (keys like "
                         f"{sorted(state)[:4]})")
    unknown = sorted(k for k in state if k != "logit_scale" and not k.startswith((EVA_ADAPTER, "visual.")))
    if unknown or "logit_scale" not in state or not visual:
        raise InputError(f"{path}: not the LLM2CLIP training layout (visual.*, {EVA_ADAPTER}*, logit_scale); "
                         f"unexpected keys {unknown[:8]}{'' if 'logit_scale' in state else ', no logit_scale'}"
                         f"{'' if visual else ', no visual.* tower'}")
    vision, projection, layers = from_open_clip(visual, f"{path} visual")
    vision_config = vision_config_from_open_clip(visual, layers, config.head_width, config.quick_gelu)
    adapter_state, shape = match_paper_adapter(adapter, f"{path} {EVA_ADAPTER.rstrip('.')}")
    model = _assemble(vision_config, vision, projection, adapter_state, shape, state["logit_scale"], config.encoder,
                      str(path))
    return model, clip_image_processor(vision_config.image_size)


def _assemble(vision_config: CLIPVisionConfig, vision: dict[str, Tensor], projection: Tensor,
              adapter: dict[str, Tensor], shape: AdapterShape, logit_scale: Tensor, encoder: Path | None,
              where: str) -> LLM2CLIPModel:
    """An LLM2CLIPModel with the paper's adapter holding exactly these weights."""
    if projection.shape[0] != shape.projection_dim:
        raise InputError(f"{where}: the visual projection maps to {projection.shape[0]} dims but the text adapter "
                         f"to {shape.projection_dim}")
    config = LLM2CLIPConfig(
        vision_config=vision_config.to_dict(), text_embed_dim=shape.embed_dim, adapter_hidden_dim=shape.hidden_dim,
        adapter_depth=shape.depth, adapter_input_l2norm=True, text_projection_bias=True,
        projection_dim=shape.projection_dim,
    )
    if encoder is not None:
        _pair_encoder(config, Path(encoder), where)
    model = LLM2CLIPModel(config)
    state = {f"vision_model.{k}": v for k, v in vision.items()}
    state.update(adapter, **{"visual_projection.weight": projection, "logit_scale": logit_scale.reshape(())})
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that disagree with the config
        raise InputError(f"{where}: the weights do not fit the model their shapes describe: "
                         f"{str(err).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{where}: missing weights {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    return model.eval()


def _pair_encoder(config: LLM2CLIPConfig, encoder: Path, where: str) -> None:
    """Check that `encoder` makes embeddings the adapter takes, and record it for evaluation."""
    from llm2clip.embed import weight_hash

    hidden = check_supported_model_dir(encoder).get("hidden_size")
    if hidden != config.text_embed_dim:
        raise InputError(f"encoder {encoder} has hidden size {hidden}, but the text adapter of {where} takes "
                         f"{config.text_embed_dim}-dim embeddings: it was trained on another LLM")
    config.text_encoder_name_or_path = str(encoder.resolve())
    config.text_encoder_fingerprint = weight_hash(encoder)


def convert_llm2vec_encoder(folder: Path, out_dir: Path) -> Path:
    """A merged llm2vec Llama with any weight-key prefix -> an encoder directory loaded without remote code."""
    config = check_supported_model_dir(folder)
    files = weight_files(folder)
    keys = [key for file in files for key in _keys(file)]
    embed = [key for key in keys if key.endswith("embed_tokens.weight")]
    if len(embed) != 1:
        raise InputError(f"{folder}: expected one embed_tokens.weight among the weights, found {embed or 'none'}")
    prefix = embed[0][: -len("embed_tokens.weight")]
    stray = [key for key in keys if not key.startswith(prefix) and key != "lm_head.weight"]
    if stray:
        raise InputError(f"{folder}: weights outside the encoder's prefix {prefix!r}: {stray[:8]}")
    config = {k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path")}
    config["architectures"] = ["LlamaModel"] if config["model_type"] == "llama" else config.get("architectures")
    config["_name_or_path"] = ENCODER_TEMPLATE_NAME
    with atomic_dir(out_dir) as tmp:
        weight_map = {}
        for file in files:
            with safe_open(file, "pt") as f:
                tensors = {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
            save_file(tensors, tmp / file.name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file.name))
        if len(files) > 1:
            size = sum((tmp / file.name).stat().st_size for file in files)
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        (tmp / SETTINGS_FILE).write_text(json.dumps(ENCODER_SETTINGS, indent=4))
    return out_dir


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards its index names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise InputError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    tensors = {}
    for file in weight_files(folder):
        tensors.update(load_file(file))
    return tensors


def read_state_file(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a torch checkpoint without unpickling code (weights_only)."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors alike
            raise InputError(f"{path}: not a loadable torch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None
        for wrapper in ("state_dict", "module", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path}: does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _keys(file: Path) -> list[str]:
    with safe_open(file, "pt") as f:
        return list(f.keys())
