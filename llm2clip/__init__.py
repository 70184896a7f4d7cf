"""llm2clip: LLM2CLIP end to end (arXiv 2411.04997).

    import llm2clip
    model = transformers.AutoModel.from_pretrained("runs/stage2/llm2clip/final")  # an LLM2CLIPModel

Importing the package registers `LLM2CLIPConfig` and `LLM2CLIPModel` with transformers' `AutoConfig` and
`AutoModel`. The other public classes load on first access, so `import llm2clip` pulls in torch and
transformers but not peft, datasets or the training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPOutput, export_vision_tower  # registers them

if TYPE_CHECKING:
    from llm2clip.embed import EmbeddingCache
    from llm2clip.text.encoder import LLMEncoder

__version__ = "0.1.0"

_LAZY = {"LLMEncoder": "llm2clip.text.encoder", "EmbeddingCache": "llm2clip.embed"}

__all__ = ["EmbeddingCache", "LLM2CLIPConfig", "LLM2CLIPModel", "LLM2CLIPOutput", "LLMEncoder",
           "export_vision_tower"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm2clip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
