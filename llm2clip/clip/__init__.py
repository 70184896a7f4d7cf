"""Stage 2: the LLM2CLIP model (CLIP vision tower + adapter over frozen LLM caption embeddings).

Importing this package registers the model with the Auto classes, so `AutoModel.from_pretrained`
loads our checkpoints with no trust_remote_code.
"""

from transformers import AutoConfig, AutoModel

from llm2clip.clip.configuration_llm2clip import LLM2CLIPConfig
from llm2clip.clip.modeling_llm2clip import LLM2CLIPModel, LLM2CLIPOutput, export_vision_tower

AutoConfig.register(LLM2CLIPConfig.model_type, LLM2CLIPConfig, exist_ok=True)
AutoModel.register(LLM2CLIPConfig, LLM2CLIPModel, exist_ok=True)

__all__ = ["LLM2CLIPConfig", "LLM2CLIPModel", "LLM2CLIPOutput", "export_vision_tower"]
