"""Prompt formats, written as Jinja chat templates so that training and inference render the same bytes.

A template renders a list of `{"role": "user" | "assistant", "content": ...}` messages. Content is a
string holding LLaVA's `<image>` placeholder, or a list of `{"type": "image"}` / `{"type": "text"}` parts
(the processor's form; an image part renders as "<image>\\n"). The same string goes into the saved
processor and tokenizer, where lmms-eval and `apply_chat_template` find it.

    plain      LLaVA's pretraining format: "<image>" + caption + "\\n". The user's words are dropped.
    vicuna_v1  LLaVA-1.5's instruction format:
               "{system} USER: <image>\\n{question} ASSISTANT: {answer}{eos}USER: {question} ASSISTANT:"
    llm        the chat template the tokenizer already carries (the LLM's own).

The model learns the assistant turns: for each one, the characters that rendering it adds after the
prompt that asks for it (its answer with the turn's end marker, e.g. " pink</s>").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llm2clip.errors import InputError

TEMPLATES = ("plain", "vicuna_v1", "llm")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# A message's content as text: a string as it is, a list of parts with each image as "<image>\n".
_TEXT = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

PLAIN = _TEXT + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ text(message['content']) ~ '\\n' }}"
    "{%- elif '<image>' in text(message['content']) -%}{{ '<image>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def vicuna_v1(system: str = VICUNA_SYSTEM) -> str:
    """LLaVA's conv_vicuna_v1 (separators " " and EOS); a leading system message replaces `system`."""
    return _TEXT + (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = text(messages[0]['content']) -%}{%- set messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {json.dumps(system)} -%}}"
        "{%- endif -%}"
        "{%- if system -%}{{ system ~ ' ' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' ~ text(message['content']) ~ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' ~ text(message['content']) ~ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def chat_template(name: str, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> str:
    """The Jinja template called `name`; `system` replaces vicuna_v1's system line."""
    if name not in TEMPLATES:
        raise InputError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if system is not None and name != "vicuna_v1":
        raise InputError(f"system_prompt applies to the vicuna_v1 template only, not to {name}")
    if name == "plain":
        return PLAIN
    if name == "vicuna_v1":
        return vicuna_v1(VICUNA_SYSTEM if system is None else system)
    if not isinstance(tokenizer.chat_template, str):
        raise InputError(f"template llm asks for the tokenizer's own chat template, but {tokenizer.name_or_path} "
                         "has none; use vicuna_v1")
    return tokenizer.chat_template


@dataclass
class Rendered:
    text: str
    targets: list[tuple[int, int]]  # character spans the model learns, one per assistant turn


def render(template: str, tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> Rendered:
    """The conversation as text, with the spans of its assistant turns."""
    def apply(part: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    if not messages or messages[0]["role"] == "assistant":
        raise InputError("a conversation must start with a user turn")
    text = apply(messages)
    targets = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = apply(messages[:i], prompt=True), apply(messages[: i + 1])
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise InputError("the chat template does not render a conversation as its prompt followed by each "
                             "answer, so the answers cannot be found; use vicuna_v1")
        targets.append((len(prompt), len(turn)))
    return Rendered(text, targets)
