"""Stage 1: the LLM as a caption encoder (tiny LLM, bidirectional attention, MNTP, caption-contrastive LoRA)."""
