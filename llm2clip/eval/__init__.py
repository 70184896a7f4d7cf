"""Stage-2 evaluation: retrieval (short, long and second-language captions), zero-shot
classification and CRA, for LLM2CLIP checkpoints and plain-CLIP baselines side by side."""

from llm2clip.eval.metrics import hit_rate, retrieval_recall, zeroshot_accuracy
from llm2clip.eval.run import EvalConfig, evaluate
from llm2clip.eval.towers import CLIPTower, ImageTextTower, LLM2CLIPTower, load_tower

__all__ = [
    "CLIPTower",
    "EvalConfig",
    "ImageTextTower",
    "LLM2CLIPTower",
    "evaluate",
    "hit_rate",
    "load_tower",
    "retrieval_recall",
    "zeroshot_accuracy",
]
