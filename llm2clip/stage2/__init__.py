"""Stage 2: train the CLIP vision tower against frozen LLM caption embeddings (`llm2clip stage2`)."""

from llm2clip.stage2.data import (
    CaptionMix,
    ImageCaptionCollator,
    ImageCaptionDataset,
    image_caption_dataset,
)
from llm2clip.stage2.train import Stage2Config, train_stage2
from llm2clip.stage2.webdataset import ShardDataset, expand_shards

__all__ = [
    "CaptionMix",
    "ImageCaptionCollator",
    "ImageCaptionDataset",
    "ShardDataset",
    "Stage2Config",
    "expand_shards",
    "image_caption_dataset",
    "train_stage2",
]
