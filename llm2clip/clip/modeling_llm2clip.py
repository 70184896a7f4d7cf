"""LLM2CLIP: a CLIP vision tower trained against a frozen LLM's caption embeddings.

There is no text transformer here: captions are embedded once by the stage-1 LLM caption encoder and
cached, and this model holds only a small adapter over those embeddings. Like `CLIPModel`,
`get_image_features` and `get_text_features` return unnormalised projections; callers L2-normalise
them (`forward` does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from llm2clip.clip.configuration_llm2clip import LLM2CLIPConfig
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from llm2clip.logs import transformers_errors_only
from llm2clip.losses import stage2_loss
from llm2clip.weights import require_weights

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor


@dataclass
class LLM2CLIPOutput(ModelOutput):
    """`loss` only with `return_loss=True`; embeddings are L2-normalised; logits include scale (and bias)."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class ResidualMLP(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x))))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class LLM2CLIPTextAdapter(nn.Module):
    """Optional whitening and L2 norm, `adapter_depth` residual MLP blocks over the LLM embedding, then a LayerNorm."""

    def __init__(self, config: LLM2CLIPConfig):
        super().__init__()
        self.whitening = config.adapter_whitening
        self.input_l2norm = config.adapter_input_l2norm
        if self.whitening:  # identity until `set_whitening`; saved with the weights
            self.register_buffer("input_mean", torch.zeros(config.text_embed_dim))
            self.register_buffer("input_whitening", torch.eye(config.text_embed_dim))
        self.blocks = nn.ModuleList(
            ResidualMLP(config.text_embed_dim, config.adapter_hidden_dim) for _ in range(config.adapter_depth)
        )
        self.norm = nn.LayerNorm(config.text_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whitening:
            x = (x - self.input_mean) @ self.input_whitening
        if self.input_l2norm:
            x = F.normalize(x, dim=-1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class LLM2CLIPModel(PreTrainedModel):
    config_class = LLM2CLIPConfig
    base_model_prefix = "llm2clip"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True  # the CLIP encoder layers checkpoint themselves
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: LLM2CLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_adapter = LLM2CLIPTextAdapter(config)
        self.text_projection = nn.Linear(config.text_embed_dim, config.projection_dim, bias=config.text_projection_bias)
        loss = stage2_loss(config.loss)
        self.loss_fn = loss.module()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        if loss.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        else:
            self.register_parameter("logit_bias", None)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # adapter Linear: normal(initializer_range), LayerNorm: identity
        if isinstance(module, LLM2CLIPTextAdapter) and module.whitening:
            init.zeros_(module.input_mean)
            init.eye_(module.input_whitening)
        if isinstance(module, LLM2CLIPModel):
            init.normal_(module.visual_projection.weight, std=self.config.vision_config.hidden_size**-0.5)
            init.normal_(module.text_projection.weight, std=self.config.text_embed_dim**-0.5)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    @classmethod
    def from_vision_pretrained(cls, clip_dir: str | os.PathLike, **config_kwargs) -> LLM2CLIPModel:
        """A new model whose vision tower comes from a local Hugging Face CLIP checkpoint directory.

        `clip_dir` holds a `CLIPModel` (such as openai/clip-vit-large-patch14-336) or a `CLIPVisionModel`.
        Only the tower is taken: CLIP's visual projection maps into its own text tower's space, which the
        LLM adapter replaces, so the projection starts fresh. `config_kwargs` set the other
        `LLM2CLIPConfig` fields (text_embed_dim, projection_dim, loss, ...).
        """
        clip_dir = Path(clip_dir)
        config_file = clip_dir / "config.json"
        if not config_file.is_file():
            raise InputError(f"{clip_dir}: no config.json; expected a local Hugging Face CLIP checkpoint directory")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise InputError(f"{clip_dir}: model_type is {model_type!r}, expected a CLIP checkpoint "
                             "('clip' or 'clip_vision_model')")
        require_weights(clip_dir)
        with transformers_errors_only():  # a CLIPModel's text tower would be listed as unexpected keys
            tower, info = CLIPVisionModel.from_pretrained(clip_dir, dtype=torch.float32, output_loading_info=True)
        if info["missing_keys"]:
            raise InputError(f"{clip_dir}: the checkpoint lacks vision tower weights {sorted(info['missing_keys'])[:5]}")
        model = cls(LLM2CLIPConfig(vision_config=tower.config.to_dict(), **config_kwargs))
        model.vision_model.load_state_dict(tower.state_dict())
        return model

    @torch.no_grad()
    def set_whitening(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        """Set the adapter's input whitening, x -> (x - mean) @ matrix (`llm2clip.embed.fit_whitening`)."""
        if not self.config.adapter_whitening:
            raise InputError("this model was built without adapter_whitening; set it in LLM2CLIPConfig")
        dim = self.config.text_embed_dim
        if tuple(mean.shape) != (dim,) or tuple(matrix.shape) != (dim, dim):
            raise InputError(f"whitening of shape {tuple(mean.shape)} and {tuple(matrix.shape)} does not fit "
                             f"text_embed_dim {dim}")
        self.text_adapter.input_mean.copy_(mean)
        self.text_adapter.input_whitening.copy_(matrix)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels -> [B, projection_dim], the projected post-LayerNorm CLS token (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, text_embed_dim] frozen LLM caption embeddings -> [B, projection_dim] (not normalised)."""
        if llm_embeddings.shape[-1] != self.config.text_embed_dim:
            raise InputError(
                f"LLM embeddings have dimension {llm_embeddings.shape[-1]} but the text adapter expects "
                f"{self.config.text_embed_dim} (config.text_embed_dim): were they made by another LLM?"
            )
        x = llm_embeddings.to(self.text_projection.weight.dtype)  # caches are often fp16
        return self.text_projection(self.text_adapter(x))

    def forward(
        self, pixel_values: torch.Tensor, llm_embeddings: torch.Tensor, return_loss: bool = False
    ) -> LLM2CLIPOutput:
        """Image i pairs with caption embedding i when `return_loss`; the loss gathers across ranks."""
        if return_loss and pixel_values.shape[0] != llm_embeddings.shape[0]:
            raise InputError(f"the loss pairs images with captions, but got {pixel_values.shape[0]} images "
                             f"and {llm_embeddings.shape[0]} caption embeddings")
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text_embeds = F.normalize(self.get_text_features(llm_embeddings), dim=-1)
        logit_scale = self.logit_scale.clamp(0, self.config.logit_scale_max).exp()
        logits_per_text = logit_scale * text_embeds @ image_embeds.T
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        loss = self.loss_fn(image_embeds, text_embeds, logit_scale, self.logit_bias) if return_loss else None
        return LLM2CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log logit scale into [0, logit_scale_max] in place; call after each optimizer step."""
        self.logit_scale.clamp_(0, self.config.logit_scale_max)

    def lock_vision_layers(self, unlocked_groups: int = 0) -> None:
        """Freeze the vision side except its last `unlocked_groups` groups (open_clip's lock_image_tower).

        Groups, first to last: the embeddings with the pre-LayerNorm, each encoder layer, then the
        post-LayerNorm with the visual projection. 0 freezes them all; -1 (or at least as many groups as
        there are) trains them all. The text adapter and the logit scale are not touched.
        """
        if unlocked_groups < -1:
            raise InputError(f"unlocked_groups must be -1 (all trainable) or more, got {unlocked_groups}")
        tower = self.vision_model
        groups = [
            [tower.embeddings, tower.pre_layrnorm],
            *[[layer] for layer in tower.encoder.layers],
            [tower.post_layernorm, self.visual_projection],
        ]
        first_trainable = 0 if unlocked_groups == -1 else max(len(groups) - unlocked_groups, 0)
        for index, group in enumerate(groups):
            for module in group:
                module.requires_grad_(index >= first_trainable)


def export_vision_tower(model: LLM2CLIPModel, out_dir: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write the vision tower alone as a plain `CLIPVisionModel` directory, with its image processor.

    `CLIPVisionModel.from_pretrained(out_dir)` and `AutoImageProcessor.from_pretrained(out_dir)` load it
    without llm2clip (for LLaVA). The processor resizes the shortest side to `image_size` (default: the
    tower's input size, which must not be larger), centre crops to the tower's size and normalises with
    CLIP's mean and std. Written to a temporary directory, then renamed over `out_dir`.
    """
    out_dir = Path(out_dir)
    crop = model.config.vision_config.image_size
    image_size = crop if image_size is None else image_size
    if image_size < crop:
        raise InputError(f"image_size {image_size} is below the tower's input size {crop}; the centre crop needs {crop} px")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    processor = clip_image_processor(image_size, crop)
    with atomic_dir(out_dir) as tmp:
        model.vision_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


__all__ = ["LLM2CLIPModel", "LLM2CLIPOutput", "export_vision_tower"]


def clip_image_processor(image_size: int, crop_size: int | None = None) -> CLIPImageProcessor:
    """CLIP's preprocessing: bicubic resize of the shortest side, centre crop, OpenAI CLIP mean/std."""
    from transformers import CLIPImageProcessor  # imported here: it is slow, and `import llm2clip` loads this module
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    crop_size = image_size if crop_size is None else crop_size
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": crop_size, "width": crop_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
