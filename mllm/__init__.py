"""LLaVA-1.5 pipeline on an LLM2CLIP vision tower (filled in by the mllm issue)."""
