"""A ViT image tower between Hugging Face CLIP names and open_clip / OpenAI CLIP names (EVA-CLIP's too).

HF's `CLIPVisionTransformer` and open_clip's `VisionTransformer` are the same network: patch conv without
bias, class token, learned positions, pre-LayerNorm, pre-LN blocks, post-LayerNorm on the class token and
a projection without bias. Only names differ, and open_clip keeps q, k and v in one `in_proj` tensor and
its projection as a [width, embed_dim] matrix. Keys here carry no `vision_model.` / `visual.` prefix.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers import CLIPVisionConfig

from llm2clip.errors import InputError

# (HF name, open_clip name) outside the blocks, and inside block i.
_TOP = [
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.weight", "ln_pre.weight"),
    ("pre_layrnorm.bias", "ln_pre.bias"),
    ("post_layernorm.weight", "ln_post.weight"),
    ("post_layernorm.bias", "ln_post.bias"),
]
_BLOCK = [
    ("layer_norm1.weight", "ln_1.weight"),
    ("layer_norm1.bias", "ln_1.bias"),
    ("self_attn.out_proj.weight", "attn.out_proj.weight"),
    ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm2.weight", "ln_2.weight"),
    ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
]
_QKV = ("q_proj", "k_proj", "v_proj")


def to_open_clip(vision: dict[str, Tensor], projection: Tensor, num_layers: int) -> dict[str, Tensor]:
    """HF `CLIPVisionTransformer` weights and the [P, D] visual projection -> open_clip `visual` weights."""
    out = {theirs: vision[ours] for ours, theirs in _TOP}
    for i in range(num_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out.update({oc + theirs: vision[hf + ours] for ours, theirs in _BLOCK})
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([vision[f"{hf}self_attn.{p}.{kind}"] for p in _QKV])
    out["proj"] = projection.T
    return {key: value.contiguous() for key, value in out.items()}


def from_open_clip(visual: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], Tensor, int]:
    """open_clip `visual` weights -> (HF `CLIPVisionTransformer` weights, [P, D] projection, layer count)."""
    layers = sorted({int(m.group(1)) for key in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", key))})
    expected = {theirs for _, theirs in _TOP} | {"proj"} | {
        f"transformer.resblocks.{i}.{name}" for i in layers
        for name in [theirs for _, theirs in _BLOCK] + ["attn.in_proj_weight", "attn.in_proj_bias"]}
    unknown, missing = sorted(set(visual) - expected), sorted(expected - set(visual))
    if unknown or missing or layers != list(range(len(layers))) or not layers:
        raise InputError(f"{where}: the image tower is not an OpenAI / open_clip ViT (an EVA02 tower needs open_clip "
                         f"or timm); unexpected keys {unknown[:8]}, missing keys {missing[:8]}")
    out = {ours: visual[theirs] for ours, theirs in _TOP}
    for i in layers:
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out.update({hf + ours: visual[oc + theirs] for ours, theirs in _BLOCK})
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, visual[f"{oc}attn.in_proj_{kind}"].chunk(3)):
                out[f"{hf}self_attn.{name}.{kind}"] = part
    return {key: value.contiguous() for key, value in out.items()}, visual["proj"].T.contiguous(), len(layers)


def vision_config_from_open_clip(visual: dict[str, Tensor], num_layers: int, head_width: int,
                                 quick_gelu: bool) -> CLIPVisionConfig:
    """The `CLIPVisionConfig` of open_clip `visual` weights; heads come from `head_width` (not in the shapes)."""
    width, _, patch, _ = visual["conv1.weight"].shape
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    if width % head_width:
        raise InputError(f"the tower's width {width} is not a multiple of head_width {head_width}")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=num_layers, num_attention_heads=width // head_width, image_size=grid * patch,
        patch_size=patch, hidden_act="quick_gelu" if quick_gelu else "gelu",
        projection_dim=visual["proj"].shape[1],
    )


def open_clip_vision_cfg(config: CLIPVisionConfig) -> tuple[dict, bool]:
    """open_clip's `vision_cfg` for a HF tower, and its `quick_gelu` flag; refuses what open_clip cannot build."""
    if config.hidden_act not in ("quick_gelu", "gelu"):
        raise InputError(f"open_clip's ViT uses GELU or QuickGELU; this tower uses {config.hidden_act!r}")
    if config.layer_norm_eps != 1e-5:
        raise InputError(f"open_clip's ViT uses LayerNorm eps 1e-5; this tower uses {config.layer_norm_eps}")
    cfg = {
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "width": config.hidden_size,
        "layers": config.num_hidden_layers,
        "head_width": config.hidden_size // config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
    }
    return cfg, config.hidden_act == "quick_gelu"
