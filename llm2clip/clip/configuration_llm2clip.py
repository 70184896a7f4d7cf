"""Configuration of the LLM2CLIP model: a CLIP vision tower and an adapter over frozen LLM caption embeddings."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, PreTrainedConfig

from llm2clip.losses import stage2_loss


@strict
class LLM2CLIPConfig(PreTrainedConfig):
    r"""
    vision_config (`dict` or `CLIPVisionConfig`, *optional*):
        The vision tower (CLIP's defaults when None; `from_vision_pretrained` fills it from a checkpoint).
    text_embed_dim (`int`, defaults to 4096):
        Dimension of the LLM caption embeddings fed to the text adapter (4096 for Llama-3-8B).
    adapter_hidden_dim (`int`, defaults to 4096):
        Inner width of each residual MLP block of the text adapter.
    adapter_depth (`int`, defaults to 4):
        Number of residual MLP blocks; 0 leaves a LayerNorm and the projection.
    adapter_input_l2norm (`bool`, defaults to `False`):
        L2-normalise the LLM embedding (after any whitening) before the residual blocks, as LLM2CLIP's
        released adapter does.
    adapter_whitening (`bool`, defaults to `False`):
        Whiten the LLM embeddings before the adapter: x -> (x - mean) @ W, with the mean and matrix held as
        buffers in the checkpoint (stage 2 fits them on its cache, `llm2clip.embed.whitening`).
    projection_dim (`int`, defaults to 1280):
        Dimension of the shared image-text space.
    text_projection_bias (`bool`, defaults to `False`):
        Give the text projection a bias, as LLM2CLIP's released adapter does. With `adapter_input_l2norm`,
        `adapter_hidden_dim` 8192 and `adapter_depth` 4 over 4096-dim embeddings this is the paper's adapter.
    loss (`"clip"` or `"siglip"`, defaults to `"clip"`):
        InfoNCE (softmax) or sigmoid loss; `"siglip"` adds a learnable logit bias.
    logit_scale_init_value (`float`, *optional*):
        Initial value of the learnable log logit scale; the loss's own when None (clip: log(1/0.07), siglip: log(10)).
    logit_scale_max (`float`, *optional*):
        The log logit scale is clamped at this value; the loss's own when None (log(100)).
    logit_bias_init_value (`float`, *optional*):
        Initial logit bias of the sigmoid loss; the loss's own when None (siglip: -10).
    initializer_range (`float`, defaults to 0.02):
        Standard deviation of the adapter's initial weights.
    text_encoder_name_or_path (`str`, *optional*):
        The LLM caption encoder whose embeddings the adapter was trained on (stage 2 fills it in).
    text_encoder_relative_path (`str`, *optional*):
        The same encoder relative to the checkpoint directory, used where the absolute path is gone (a moved
        `runs/` tree).
    text_encoder_fingerprint (`str`, *optional*):
        Fingerprint of that encoder's weights and settings (`llm2clip.embed.weight_hash`); evaluation
        refuses an encoder with another fingerprint.
    text_encoder_pooling_mode (`str`, *optional*) and text_encoder_max_length (`int`, *optional*):
        The pooling and truncation the embeddings were made with, when they override the encoder's own.
    """

    model_type = "llm2clip"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    text_embed_dim: int = 4096
    adapter_hidden_dim: int = 4096
    adapter_depth: int = 4
    adapter_input_l2norm: bool = False
    adapter_whitening: bool = False
    projection_dim: int = 1280
    text_projection_bias: bool = False
    loss: Literal["clip", "siglip"] = "clip"
    logit_scale_init_value: float | int | None = None
    logit_scale_max: float | int | None = None
    logit_bias_init_value: float | int | None = None
    initializer_range: float = 0.02
    text_encoder_name_or_path: str | None = None
    text_encoder_relative_path: str | None = None
    text_encoder_fingerprint: str | None = None
    text_encoder_pooling_mode: str | None = None
    text_encoder_max_length: int | None = None

    def __post_init__(self, **kwargs):
        loss = stage2_loss(self.loss)  # unset logit settings are the loss's
        if self.logit_scale_init_value is None:
            self.logit_scale_init_value = loss.logit_scale_init
        if self.logit_scale_max is None:
            self.logit_scale_max = loss.logit_scale_max
        if self.logit_bias_init_value is None:
            self.logit_bias_init_value = loss.logit_bias_init
        super().__post_init__(**kwargs)

    def validate_llm2clip(self):
        """Part of `@strict` validation: sizes must make a model."""
        for name in ("text_embed_dim", "adapter_hidden_dim", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.adapter_depth < 0:
            raise ValueError(f"adapter_depth must be 0 or more, got {self.adapter_depth}")
        if self.logit_scale_init_value > self.logit_scale_max:
            raise ValueError(
                f"logit_scale_init_value ({self.logit_scale_init_value}) is above logit_scale_max ({self.logit_scale_max})"
            )


__all__ = ["LLM2CLIPConfig"]
