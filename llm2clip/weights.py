"""The weight files a local model directory must hold before transformers or peft is asked to load it.

Without them `from_pretrained` ends in an OSError traceback; `require_weights` names the directory and
the files it looked for in one line instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from llm2clip.errors import InputError

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
MODEL_WEIGHTS = (*SAFETENSORS_WEIGHTS, "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def require_weights(model_dir: str | os.PathLike, names: Sequence[str] = MODEL_WEIGHTS) -> None:
    """Raise InputError unless `model_dir` holds one of the weight files `names`, with every shard its index lists."""
    model_dir = Path(model_dir)
    present = [name for name in names if (model_dir / name).is_file()]
    if not present:
        raise InputError(f"{model_dir}: no weights (none of {', '.join(names)})")
    for index in (name for name in present if name.endswith(".index.json")):
        try:
            shards = set(json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"cannot read the weight map of {model_dir / index}: {err!r}") from None
        missing = sorted(str(shard) for shard in shards if not (model_dir / str(shard)).is_file())
        if missing:
            raise InputError(f"{model_dir}: {index} lists weight files that are missing: {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
