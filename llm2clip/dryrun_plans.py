"""The models that `stage1 mntp`, `stage1 contrastive`, `embed` and `stage2` would build, at full size on meta."""

from __future__ import annotations

from peft import get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionConfig

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.dryrun import Plan, on_meta, read_model_config
from llm2clip.embed.build import EmbedConfig
from llm2clip.errors import InputError
from llm2clip.stage2.train import Stage2Config, _new_vision_config
from llm2clip.text.contrastive import ContrastiveConfig
from llm2clip.text.encoder import DEFAULTS, SUPPORTED_MODEL_TYPES, _read_settings
from llm2clip.text.mntp import MNTPConfig, lora_config


def _llm_config(path, what: str):
    config = read_model_config(path, what)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{what} {path}: model_type {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def _llm_facts(config) -> dict:
    return {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size, "rope_theta": (config.rope_parameters or {}).get("rope_theta")}


def plan_mntp(config: MNTPConfig) -> Plan:
    llm = _llm_config(config.model, "model")
    model = on_meta(lambda: get_peft_model(AutoModelForCausalLM.from_config(llm), lora_config(config.lora)))
    shapes = {"tokens per GPU step": f"[{config.train.batch_size}, {config.max_seq_length}] "
                                     f"({config.mask_ratio:.0%} masked), bidirectional attention"}
    return Plan("stage1 mntp", model, shapes, config.train, _llm_facts(llm))


def plan_contrastive(config: ContrastiveConfig) -> Plan:
    llm = _llm_config(config.model, "model")
    model = on_meta(lambda: get_peft_model(AutoModel.from_config(llm), lora_config(config.lora)))
    shapes = {"tokens per GPU step": f"2 x [{config.train.batch_size}, <= {config.max_length}] (caption pairs), "
                                     f"pooled to [{config.train.batch_size}, {llm.hidden_size}]"}
    return Plan("stage1 contrastive", model, shapes, config.train, _llm_facts(llm))


def plan_embed(config: EmbedConfig) -> Plan:
    llm = _llm_config(config.model, "model")
    model = on_meta(lambda: AutoModel.from_config(llm)).requires_grad_(False)
    settings = {**DEFAULTS, **_read_settings(config.model)}
    max_length = config.max_length or settings["max_length"]
    shapes = {"tokens per forward": f"[{config.batch_size}, <= {max_length}] -> embeddings "
                                    f"[{config.batch_size}, {llm.hidden_size}] stored as {config.dtype}"}
    return Plan("embed", model, shapes, None, _llm_facts(llm))


def plan_stage2(config: Stage2Config) -> Plan:
    if config.model_type != "llm2clip":
        raise InputError("the dry run covers model_type llm2clip (the CLIP baseline needs its tokenizer)")
    if config.adapter.input_dim is None:
        raise InputError("a dry run has no cache to read the LLM embedding width from; set adapter.input_dim")
    if config.vision.pretrained is not None:
        vision = read_model_config(config.vision.pretrained, "vision.pretrained")
        vision = vision.vision_config if vision.model_type == "clip" else vision
        if not isinstance(vision, CLIPVisionConfig):
            raise InputError(f"vision.pretrained {config.vision.pretrained} is not a CLIP checkpoint")
    else:
        vision = _new_vision_config(config.vision)
    # The same sizes as stage2.train.build_model.
    llm2clip = LLM2CLIPConfig(
        vision_config=vision.to_dict(), text_embed_dim=config.adapter.input_dim,
        adapter_hidden_dim=config.adapter.hidden_dim, adapter_depth=config.adapter.depth,
        adapter_whitening=config.adapter.whiten, adapter_input_l2norm=config.adapter.input_l2norm,
        text_projection_bias=config.adapter.projection_bias, projection_dim=config.projection_dim, loss=config.loss,
    )
    model = on_meta(lambda: LLM2CLIPModel(llm2clip))
    model.lock_vision_layers(config.unlocked_vision_groups)
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    batch = config.train.batch_size
    text_side = [*model.text_adapter.parameters(), *model.text_projection.parameters()]
    shapes = {"images per GPU step": f"[{batch}, 3, {vision.image_size}, {vision.image_size}] -> {tokens} tokens "
                                     f"(patches + CLS) of {vision.hidden_size}",
              "caption embeddings per GPU step": f"[{batch}, {config.adapter.input_dim}] from the cache"}
    facts = {"image_tokens": tokens, "vision_hidden": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
             "adapter_parameters": sum(p.numel() for p in text_side)}
    return Plan("stage2", model, shapes, config.train, facts)
