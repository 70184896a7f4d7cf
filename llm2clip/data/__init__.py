"""Data: the synthetic world (`synth`) and loaders for local image-text files (`records`)."""

from llm2clip.data.records import ImageText, check_image, load_image_texts, read_corpus

__all__ = ["ImageText", "check_image", "load_image_texts", "read_corpus"]
