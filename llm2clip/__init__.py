"""llm2clip: LLM2CLIP end to end (arXiv 2411.04997)."""

__version__ = "0.1.0"
