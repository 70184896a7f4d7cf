"""The public API: `import llm2clip` exports the user-facing classes and registers the Auto classes."""

import subprocess
import sys

import pytest
import torch

import llm2clip
from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8}

# A fresh interpreter: nothing but `import llm2clip` may be needed before AutoModel loads our checkpoint.
FRESH_LOAD = """
import sys
import llm2clip
from transformers import AutoConfig, AutoModel
heavy = sorted(name for name in ("peft", "datasets", "llm2clip.text.encoder", "llm2clip.stage2") if name in sys.modules)
assert not heavy, f"import llm2clip loaded {heavy}"
model = AutoModel.from_pretrained(sys.argv[1])
config = AutoConfig.from_pretrained(sys.argv[1])
from llm2clip import LLM2CLIPConfig, LLM2CLIPModel, LLMEncoder
assert type(model) is LLM2CLIPModel and type(config) is LLM2CLIPConfig, (type(model), type(config))
assert LLMEncoder.__module__ == "llm2clip.text.encoder"
print(model.config.text_embed_dim)
"""


def test_every_public_name_resolves_at_the_top_level():
    for name in llm2clip.__all__:
        assert getattr(llm2clip, name) is not None, name
        assert name in dir(llm2clip)
    assert llm2clip.LLM2CLIPModel is LLM2CLIPModel and llm2clip.LLM2CLIPConfig is LLM2CLIPConfig
    from llm2clip import EmbeddingCache, LLMEncoder  # the lazy ones
    from llm2clip.embed.cache import EmbeddingCache as cache_class
    from llm2clip.text.encoder import LLMEncoder as encoder_class
    assert LLMEncoder is encoder_class and EmbeddingCache is cache_class


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'LLM2ClipModel'"):
        llm2clip.LLM2ClipModel  # noqa: B018


def test_a_fresh_process_loads_a_checkpoint_with_automodel_after_import_llm2clip(tmp_path):
    torch.manual_seed(0)
    LLM2CLIPModel(LLM2CLIPConfig(vision_config=TINY_VISION, text_embed_dim=24, adapter_hidden_dim=48,
                                 projection_dim=16)).save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "24"
