"""lmms-eval hooks for the synthetic world's QA suite (loaded by the task YAMLs beside this file)."""

from __future__ import annotations

import re

from PIL import Image

from llm2clip.data.synth import SHORT_ANSWER

NUMBERS = {word: str(i) for i, word in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize(text: str) -> str:
    """Lowercase, punctuation as spaces, number words as digits, single spaces."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    return " ".join(NUMBERS.get(word, word) for word in words)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    # The finetuning prompt of the world's instruction data, so train and test questions match.
    return doc["question"] + SHORT_ANSWER


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0], doc["answer"])}
