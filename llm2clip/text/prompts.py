"""Text preparation exactly as llm2vec 0.2.3 does it.

A text becomes `instruction !@#$%^&*()text`: the part after the separator is what the pooling
sees when `skip_instruction` is on. Long documents are cut word by word to `doc_max_length`
tokens, then a chat template chosen by the model's hub name wraps the whole string, and for
eos_token pooling an end-of-sequence marker is appended.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

SEPARATOR = "!@#$%^&*()"

# (prefix, suffix) around the text, keyed on the model's hub name (config `_name_or_path`).
TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# llm2vec returns the Llama-3-Instruct prompt as is, without the eos_token marker.
NO_EOS_MARKER = {"meta-llama/Meta-Llama-3-8B-Instruct"}
# Marker appended for eos_token pooling: by hub name first, then by model type. Types that
# llm2vec does not know (qwen3) get their tokenizer's eos token.
EOS_MARKER_BY_NAME = {"meta-llama/Meta-Llama-3-8B": "<|end_of_text|>"}
EOS_MARKER_BY_TYPE = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}


def join_instruction(instruction: str, text: str) -> str:
    return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def split_instruction(prepared: str) -> tuple[str, str]:
    """(text the model reads, part that is pooled when the instruction is skipped)."""
    parts = prepared.split(SEPARATOR)
    return "".join(parts), parts[1] if len(parts) > 1 else ""


def apply_template(text: str, model_name: str, model_type: str, pooling_mode: str, eos_token: str | None) -> str:
    if model_name in TEMPLATES:
        prefix, suffix = TEMPLATES[model_name]
        text = prefix + text.strip() + suffix
    if pooling_mode != "eos_token" or model_name in NO_EOS_MARKER:
        return text
    marker = EOS_MARKER_BY_NAME.get(model_name) or EOS_MARKER_BY_TYPE.get(model_type) or eos_token or ""
    return text.strip() + marker


def truncate_words(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, doc_max_length: int
) -> tuple[list[str], int]:
    """Cut texts longer than doc_max_length tokens word by word, as llm2vec does.

    Returns the texts and how many were cut.
    """
    def count(batch: list[str]) -> list[int]:
        ids = tokenizer(batch, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return [len(row) for row in ids]

    out = list(texts)
    lengths = count(out) if out else []
    todo = [i for i, n in enumerate(lengths) if n > doc_max_length]
    n_cut = len(todo)
    while todo:
        for i in todo:
            words = out[i].split()
            out[i] = " ".join(words[: int(len(words) * doc_max_length / lengths[i])])
        for i, n in zip(todo, count([out[i] for i in todo])):
            lengths[i] = n
        todo = [i for i in todo if lengths[i] > doc_max_length]
    return out, n_cut
