"""`mllm export`: a training output as a plain HF Llava directory, reloaded and asked a question.

The input is a Llava directory (finetune's or pretrain's final/, or a Trainer checkpoint of a full
finetune) or a LoRA adapter directory (final/ or a checkpoint of a LoRA finetune), whose adapter is
merged into the base it records. The output holds the model (safetensors), the processor with its
chat template and the generation config, and nothing else: `LlavaForConditionalGeneration.
from_pretrained` and `AutoProcessor.from_pretrained` load it without llm2clip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from llm2clip.errors import InputError
from mllm.builder import load_llava, save_llava


@dataclass
class ExportConfig:
    model: Path = Path("runs/mllm/finetune/final")  # a Llava directory, a LoRA adapter directory or a checkpoint
    out_dir: Path = Path("runs/mllm/llava")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the weights' own
    image: Path | None = Path("runs/world/images/val/val-00000.png")  # the reload check asks about it; null: no check
    question: str = "What color is the star?\nAnswer the question using a single word or phrase."
    max_new_tokens: int = 16


def export(config: ExportConfig) -> dict:
    if config.image is not None and not Path(config.image).is_file():
        raise InputError(f"image for the reload check not found: {config.image} (set image=null to skip the check)")
    model, processor = load_trained(Path(config.model))
    if config.dtype != "auto":
        model = model.to(getattr(torch, config.dtype))
    out = save_llava(model, processor, Path(config.out_dir))
    report = {"out_dir": str(out), "source": str(config.model), "dtype": str(model.dtype).removeprefix("torch.")}
    print(f"mllm export: wrote {out} ({report['dtype']})")
    if config.image is not None:
        model = LlavaForConditionalGeneration.from_pretrained(out)
        processor = AutoProcessor.from_pretrained(out)
        with Image.open(config.image) as image:
            report["answer"] = ask(model, processor, image.convert("RGB"), config.question, config.max_new_tokens)
        print(f"mllm export: reloaded; asked {config.question!r} about {config.image}: {report['answer']!r}")
    return report


def load_trained(path: Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A Llava and its processor from a Llava directory, or from a LoRA adapter merged into its base."""
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        return load_llava(path)
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise InputError(f"the LoRA adapter in {path} was trained on {base!r}, which is not a directory here")
    model, _ = load_llava(Path(base))
    processor = LlavaProcessor.from_pretrained(path)  # the finetune's, with the chat template it trained with
    return PeftModel.from_pretrained(model, path).merge_and_unload(), processor


@torch.inference_mode()
def ask(model: LlavaForConditionalGeneration, processor: LlavaProcessor, image: Image.Image, question: str,
        max_new_tokens: int = 16) -> str:
    """Greedy answer to one question about one image, prompted with the processor's chat template."""
    messages = [{"role": "user", "content": f"<image>\n{question}"}]  # LLaVA's form, which every template takes
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    inputs = processor(images=image, text=prompt, add_special_tokens=not (bos and prompt.startswith(bos)),
                       return_tensors="pt").to(model.device, model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
