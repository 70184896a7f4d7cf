"""Zero-shot classification: class names and prompt templates become a text classifier.

Class names come from a text file, one per line (`configs/classnames/synth_shapes.txt` holds the
synthetic world's shapes, the default; an ImageNet file with its 1000 names works the same way). Labelled images come
from a JSONL file, one `{"image": ..., "label": ...}` per line, where the label is a class name or
its 0-based line index, or from a synthetic world split, where the label is the shape of the
scene's main object (`objects[0]`): the largest in the image and the one its short captions name,
so that one label fits a scene of 3-9 shapes. The report puts the chance level beside the accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from llm2clip.data.records import read_jsonl
from llm2clip.errors import InputError
from llm2clip.eval.towers import ImageTextTower

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
)


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason})") from None
    while lines and not lines[-1].strip():  # a trailing newline is not a blank entry
        lines.pop()
    if not lines:
        raise InputError(f"{what} file {path} is empty")
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{path}: line {number} is blank")
        if line.strip() in seen:
            raise InputError(f"{path}: line {number} repeats line {seen[line.strip()]} ({line.strip()!r})")
        seen[line.strip()] = number
    return [line.strip() for line in lines]


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names, one per line; blank or repeated lines are errors."""
    return _lines(Path(path), "class names")


def read_templates(path: str | os.PathLike | None) -> list[str]:
    """Prompt templates with one `{}` each, one per line (None: the built-in list)."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = _lines(Path(path), "templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise InputError(f"{path}: line {number} needs exactly one '{{}}' for the class name: {template!r}")
    return templates


def jsonl_entries(path: str | os.PathLike, split: str) -> list[tuple[Path, dict, str]]:
    """(absolute image path, raw entry, "file:line") for each line of a world split or a JSONL file.

    Lines of a JSONL file that carry a "split" other than `split` are left out. Image paths are
    relative to the file's directory, as in `llm2clip.data.records`.
    """
    path = Path(path)
    if path.is_dir() and (path / "world.json").is_file():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise InputError(f"world {path} has no split '{split}' ({file.name} is missing)")
    elif path.suffix == ".jsonl" and path.is_file():
        file = path
    else:
        raise InputError(f"{path}: expected a synthetic world directory or a .jsonl file of images with labels")
    entries = []
    for number, entry in read_jsonl(file):
        where = f"{file}:{number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise InputError(f"{where}: expected a JSON object with an 'image' path")
        if "split" in entry and entry["split"] != split:
            continue
        entries.append((Path(os.path.abspath(file.parent / entry["image"])), entry, where))
    if not entries:
        raise InputError(f"{file}: no entries in split '{split}'")
    return entries


def _label(entry: dict, where: str) -> int | str:
    if "label" in entry:
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise InputError(f"{where}: 'label' must be a class name or a class index, got {label!r}")
        return label
    objects = entry.get("objects") or [{}]
    if isinstance(objects, list) and isinstance(objects[0], dict) and isinstance(objects[0].get("shape"), str):
        return objects[0]["shape"]
    raise InputError(f"{where}: no 'label' (and no objects[0].shape to take it from)")


def labelled_images(path: str | os.PathLike, split: str, classnames: list[str]) -> list[tuple[Path, int]]:
    """(image path, class index) pairs; labels that are not in `classnames` are errors."""
    index = {name: i for i, name in enumerate(classnames)}
    pairs = []
    for image, entry, where in jsonl_entries(path, split):
        label = _label(entry, where)
        if isinstance(label, int):
            if not 0 <= label < len(classnames):
                raise InputError(f"{where}: label {label} is outside the {len(classnames)} class names")
            pairs.append((image, label))
        elif label in index:
            pairs.append((image, index[label]))
        else:
            raise InputError(f"{where}: label {label!r} is not among the class names ({', '.join(classnames[:8])}"
                             + (", ..." if len(classnames) > 8 else "") + ")")
    return pairs


def class_embeddings(tower: ImageTextTower, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[classes, D]: the normalised mean of each class's normalised template embeddings."""
    prompts = [template.format(name) for name in classnames for template in templates]
    features = tower.text_features(prompts).reshape(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)
