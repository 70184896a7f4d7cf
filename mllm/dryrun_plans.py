"""The Llava that `mllm pretrain` and `mllm finetune` would train, at full size on the meta device."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from llm2clip.dryrun import Plan, on_meta, read_model_config
from llm2clip.errors import InputError
from mllm.train import FinetuneConfig, PretrainConfig, _with_lora


def _facts(config: LlavaConfig, model: LlavaForConditionalGeneration) -> dict:
    projector = model.model.multi_modal_projector
    text = config.text_config
    return {"projector": (projector.linear_1.in_features, projector.linear_1.out_features,
                          projector.linear_2.out_features),
            "image_tokens": config.image_seq_length, "llm_hidden": text.hidden_size, "llm_layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size}


def _shapes(config: LlavaConfig, batch: int, max_length: int) -> dict[str, str]:
    vision = config.vision_config
    return {"images per GPU step": f"[{batch}, 3, {vision.image_size}, {vision.image_size}] -> "
                                   f"{config.image_seq_length} image tokens (layer {config.vision_feature_layer}, "
                                   f"{config.vision_feature_select_strategy}) of {vision.hidden_size} -> "
                                   f"{config.text_config.hidden_size}",
            "sequence per GPU step": f"[{batch}, <= {max_length}] tokens, image tokens included"}


def plan_pretrain(config: PretrainConfig) -> Plan:
    build = config.model
    vision = read_model_config(build.vision_tower, "model.vision_tower")
    vision = vision.vision_config if vision.model_type == "clip" else vision
    if not isinstance(vision, CLIPVisionConfig):
        raise InputError(f"model.vision_tower {build.vision_tower} is not a CLIP tower")
    text = read_model_config(build.llm, "model.llm")
    text.vocab_size += 1  # the <image> token that build_llava adds (Vicuna pads with its unk token)
    patches = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=patches + (build.vision_feature_select_strategy == "full"),
        vision_feature_layer=build.vision_feature_layer,
        vision_feature_select_strategy=build.vision_feature_select_strategy, projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    model = on_meta(lambda: LlavaForConditionalGeneration(llava))
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("model.multi_modal_projector.")  # as mllm.train.pretrain
    return Plan("mllm pretrain", model, _shapes(llava, config.train.batch_size, config.data.model_max_length),
                config.train, _facts(llava, model))


def plan_finetune(config: FinetuneConfig) -> Plan:
    llava = read_model_config(config.model, "model")
    if not isinstance(llava, LlavaConfig):
        raise InputError(f"model {config.model} is not a Llava checkpoint (model_type {llava.model_type!r})")
    model = on_meta(lambda: LlavaForConditionalGeneration(llava))
    for name, param in model.named_parameters():  # as mllm.train.finetune
        param.requires_grad = config.vision_lr is not None or not name.startswith("model.vision_tower.")
    facts = _facts(llava, model)
    if config.tune == "lora":
        model = on_meta(lambda: _with_lora(model, config.lora, train_tower=config.vision_lr is not None))
    return Plan("mllm finetune", model, _shapes(llava, config.train.batch_size, config.data.model_max_length),
                config.train, facts)
