"""Checkpoints in and out: the official LLM2CLIP releases, open_clip and LLaVA layouts."""
