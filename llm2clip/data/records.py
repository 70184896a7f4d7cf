"""Image-text records from local files, whatever their public format.

`load_image_texts` detects the format from the path:
- a synthetic world directory (holds world.json): reads `<split>.jsonl`;
- a `.jsonl` file, one object per line with `image` and `captions` (a list or a string), and
  optionally `long_caption(s)`, `captions_fr` / `long_caption_fr`, `qa` and `split`;
- a COCO-Karpathy `.json` (`{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}`),
  where "restval" counts as train;
- a ShareGPT4V / LLaVA `.json` (`[{"id", "image", "conversations": [human, gpt]}]`): the gpt turn
  is the long caption and its first sentence the short one (as Long-CLIP does).
Images are not opened here; `check_image` does that for the training data pipeline.

Entries that cannot be used (no image, no short caption, ...) are left out and counted by reason, for
the calling step to report. An entry that lacks the format's caption key altogether ('caption' for
'captions', say) is a mistake in the file: past `MAX_MISSING_KEY_FRACTION` of a file's entries that is
an InputError naming the first such entry.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from llm2clip.errors import InputError

WORLD_SPLITS = ("train", "val", "test")
JSONL_KEYS = ("id", "image", "captions", "long_caption", "long_captions", "captions_fr", "long_caption_fr", "qa",
              "split")
KARPATHY_KEYS = ("filepath", "filename", "split", "sentences", "sentids", "imgid", "cocoid")
MAX_MISSING_KEY_FRACTION = 0.1  # of a file's entries that may lack the caption key before the file is refused


class _FileSkips:
    """The entries of one file that are left out, by reason, and the first that lacks the caption key."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = 0  # of the requested split
        self.reasons: Counter[str] = Counter()
        self.missing_key = 0
        self.first_missing_key = ""

    def keep(self) -> None:
        self.entries += 1

    def skip(self, reason: str) -> None:
        self.entries += 1
        self.reasons[reason] += 1

    def skip_missing_key(self, entry: dict, key: str, known: tuple[str, ...], where: str) -> None:
        """Leave out `entry`, which has no `key` (the format's keys are `known`); `where` names it ("line 2")."""
        self.skip(f"with no '{key}' key")
        self.missing_key += 1
        if not self.first_missing_key:
            unknown = [name for name in entry if name not in known]
            near = difflib.get_close_matches(key, unknown, n=1) or unknown[:1]
            self.first_missing_key = (f"{where} has key '{near[0]}', expected '{key}'" if near
                                      else f"{where} has no '{key}' key")

    def check(self) -> None:
        if self.missing_key > MAX_MISSING_KEY_FRACTION * self.entries:
            raise InputError(f"{self.path}: {self.missing_key} of {self.entries} entries lack their caption key "
                             f"(more than {MAX_MISSING_KEY_FRACTION:.0%}); the first: {self.first_missing_key}")


@dataclass
class ImageText:
    image: Path  # absolute path
    captions: list[str]  # short captions (>= 1)
    long_captions: list[str] = field(default_factory=list)
    translated: list[str] = field(default_factory=list)  # second-language captions (short + long)
    captions_fr: list[str] = field(default_factory=list)  # captions_fr[i] renders captions[i]
    long_captions_fr: list[str] = field(default_factory=list)  # long_captions_fr[i] renders long_captions[i]
    qa: list[dict] = field(default_factory=list)  # {"question", "answer", "type"}
    id: str = ""


def describe_counts(counts: Mapping[str, int], empty: str = "none") -> str:
    """Counts by reason as one phrase ("3 empty captions, 1 missing image"), or `empty` when there are none."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.items()) or empty


def load_image_texts(path: str | Path, split: str | None = "train", image_root: str | Path | None = None,
                     skipped: Counter[str] | None = None) -> list[ImageText]:
    """Records of one split (None: all). Splits apply to world directories, Karpathy JSON and JSONL
    lines that carry a "split" key; ShareGPT4V files have none. Image paths are resolved against
    `image_root`, by default the directory of the file that lists them. The entries left out are
    added to `skipped` by reason, for the caller to report."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    skipped = Counter() if skipped is None else skipped
    if path.is_dir():
        if not (path / "world.json").is_file():
            raise InputError(f"{path} is a directory without world.json; give a world directory, a .jsonl or a .json file")
        records = []
        for name in [split] if split else WORLD_SPLITS:
            file = path / f"{name}.jsonl"
            if not file.is_file():
                raise InputError(f"world {path} has no split '{name}' ({file.name} is missing)")
            records += _read_jsonl(file, None, image_root, skipped)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path, split, image_root, skipped)
    elif path.suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            records = _read_karpathy(path, data["images"], split, image_root, skipped)
        elif isinstance(data, list) and any(isinstance(e, dict) and "conversations" in e for e in data):
            records = _read_conversations(path, data, image_root, skipped)
        else:
            found = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
            raise InputError(
                f"{path}: unknown JSON format ({found}); expected COCO-Karpathy ({{'images': [...]}}) "
                "or a ShareGPT4V/LLaVA list of {'image', 'conversations'}"
            )
    else:
        raise InputError(f"{path}: unknown dataset format; give a world directory, a .jsonl or a .json file")
    if not records:
        where = f" in split '{split}'" if split else ""
        left_out = f" ({', '.join(f'{n} {reason}' for reason, n in skipped.items())})" if skipped else ""
        raise InputError(f"{path}: no usable entries{where}{left_out}")
    return records


def _root(path: Path, image_root: str | Path | None) -> Path:
    return Path(image_root) if image_root is not None else path.parent


def _absolute(root: Path, image: str) -> Path:
    return Path(os.path.abspath(root / image))


def _split_name(name: object) -> str:
    return "train" if name == "restval" else str(name)


def _texts(value: object, where: str, key: str) -> list[str]:
    """A caption field as a list of non-empty strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise InputError(f"{where}: '{key}' must be a string or a list of strings")
    return [t.strip() for t in items if t.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason})") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSON Lines file."""
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
        yield lineno, value


def _read_jsonl(path: Path, split: str | None, image_root: str | Path | None, skipped: Counter[str]) -> list[ImageText]:
    root = _root(path, image_root)
    records = []
    skips = _FileSkips(path)
    for lineno, entry in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        if split and "split" in entry and _split_name(entry["split"]) != split:
            continue
        if not isinstance(entry.get("image"), str):
            raise InputError(f"{where}: needs an 'image' path (string)")
        if "captions" not in entry:
            skips.skip_missing_key(entry, "captions", JSONL_KEYS, f"line {lineno}")
            continue
        captions = _texts(entry["captions"], where, "captions")
        long_captions = (_texts(entry.get("long_caption"), where, "long_caption")
                         + _texts(entry.get("long_captions"), where, "long_captions"))
        if not captions:
            skips.skip("with long captions but no short ones" if long_captions else "with no captions")
            continue
        qa = entry.get("qa", [])
        if not isinstance(qa, list) or not all(isinstance(q, dict) for q in qa):
            raise InputError(f"{where}: 'qa' must be a list of objects")
        captions_fr = _texts(entry.get("captions_fr"), where, "captions_fr")
        long_captions_fr = _texts(entry.get("long_caption_fr"), where, "long_caption_fr")
        skips.keep()
        records.append(ImageText(
            image=_absolute(root, entry["image"]),
            captions=captions,
            long_captions=long_captions,
            translated=captions_fr + long_captions_fr,
            captions_fr=captions_fr,
            long_captions_fr=long_captions_fr,
            qa=qa,
            id=str(entry.get("id", f"{path.stem}-{lineno}")),
        ))
    skips.check()
    skipped.update(skips.reasons)
    return records


def _read_karpathy(path: Path, images: list, split: str | None, image_root: str | Path | None,
                   skipped: Counter[str]) -> list[ImageText]:
    root = _root(path, image_root)
    records = []
    skips = _FileSkips(path)
    for k, image in enumerate(images):
        where = f"{path}: images[{k}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise InputError(f"{where} needs a 'filename'")
        if split and _split_name(image.get("split", "train")) != split:
            continue
        if "sentences" not in image:
            skips.skip_missing_key(image, "sentences", KARPATHY_KEYS, f"images[{k}]")
            continue
        sentences = image["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise InputError(f"{where}: 'sentences' must be a list of objects with a 'raw' string")
        captions = [s["raw"].strip() for s in sentences if s["raw"].strip()]
        if not captions:
            skips.skip("with no captions")
            continue
        skips.keep()
        file = Path(image.get("filepath", "")) / image["filename"]
        records.append(ImageText(image=_absolute(root, str(file)), captions=captions,
                                 id=str(image.get("cocoid", image.get("imgid", k)))))
    skips.check()
    skipped.update(skips.reasons)
    return records


_FIRST_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)", re.DOTALL)


def _read_conversations(path: Path, entries: list[dict], image_root: str | Path | None,
                        skipped: Counter[str]) -> list[ImageText]:
    root = _root(path, image_root)
    records = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "conversations" not in entry:
            raise InputError(f"{path}: entry {k} has no 'conversations'")
        where = f"{path}: entry {k} (id {entry.get('id', '?')})"
        turns = entry["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise InputError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns")
        if not isinstance(entry.get("image"), str):
            skipped["without an image"] += 1
            continue
        answer = next((t["value"].strip() for t in turns if t.get("from") in ("gpt", "assistant")), "")
        if not answer:
            skipped["with no captions"] += 1
            continue
        first = _FIRST_SENTENCE.match(answer)
        records.append(ImageText(
            image=_absolute(root, entry["image"]),
            captions=[first.group(1).strip() if first else answer],
            long_captions=[answer],
            id=str(entry.get("id", k)),
        ))
    return records


def check_image(path: str | Path) -> str | None:
    """Why an image cannot be used (missing, unreadable, truncated), or None when it is fine."""
    path = Path(path)
    if not path.is_file():
        return f"missing image {path}"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() leaves the file unusable; load() catches truncation
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"corrupt image {path}: {err}"
    return None


def read_corpus(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (or of corpus.txt in a world directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.txt"
    if not path.is_file():
        raise InputError(f"corpus not found: {path}")
    lines = [line.strip() for line in _read_text(path).split("\n") if line.strip()]
    if not lines:
        raise InputError(f"corpus {path} is empty")
    return lines
