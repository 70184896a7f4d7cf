"""The caption-embedding cache: the frozen LLM's caption embeddings, computed once for stage 2.

`build.build_cache` (the `llm2clip embed` command) writes a cache; `EmbeddingCache` reads one.
"""

from llm2clip.embed.cache import KINDS, EmbeddingCache, caption_hash, caption_table, weight_hash

__all__ = ["KINDS", "EmbeddingCache", "caption_hash", "caption_table", "weight_hash"]
