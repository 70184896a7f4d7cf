"""The caption-embedding cache on disk: a manifest, a row table and embedding shards.

A cache directory holds:
- `manifest.json`: the encoder (path, weight hash, pooling, max length), dtype and dim, the dataset
  (path, split, image count), the cached caption kinds with their count and hash, the shard list,
  and `complete`, true once every shard and the row table are written;
- `rows_image.npy` (int32) and `rows_kind.npy` (uint8): each row's image index and kind id;
- `rows_offsets.npy` (int64): CSR offsets, the rows of image i and kind k are
  `offsets[i * len(KINDS) + k]` up to `offsets[i * len(KINDS) + k + 1]`;
- `shard-00000-<key>.npy`, ...: [rows, dim] embeddings of rows `s * shard_size` onwards. `<key>`
  names the build, so that the shards of another build are never taken for this one's.
Rows run image by image, kinds in `KINDS` order, captions in dataset order. Every file is written
to a temporary file and renamed into place, and nothing is ever read through pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip.data.records import ImageText
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_save_npy, atomic_write_json

KINDS = ("short", "long", "translated")
FORMAT = 2  # 2: weight_hash reads whole weight files (1 sampled them)
MANIFEST = "manifest.json"
ROW_FILES = {"image": "rows_image.npy", "kind": "rows_kind.npy", "offsets": "rows_offsets.npy"}
MAX_HEADER = 100_000_000  # the safetensors format's own limit
DIGESTS_FILE = "weight_digests.json"  # per-file sha256 kept beside the weights, keyed by name, size and mtime
SMALL_FILES = ("config.json", "llm2vec_config.json", "adapter_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")
REBUILD = "rebuild the cache with `llm2clip embed ... overwrite=true`"
MANIFEST_KEYS = ("format", "complete", "key", "encoder", "weight_hash", "pooling_mode", "max_length", "dtype", "dim",
                 "dataset", "split", "images", "kinds", "captions", "caption_hash", "shard_size", "shards")


@dataclass
class CaptionTable:
    """The rows of a cache: every non-empty caption of the chosen kinds, image by image."""

    texts: list[str]
    image: np.ndarray  # int32 [rows]
    kind: np.ndarray  # uint8 [rows], index into KINDS
    offsets: np.ndarray  # int64 [images * len(KINDS) + 1]
    hash: str  # sha256 over (image index, kind, text) of every row in order
    skipped_empty: int  # empty captions left out
    images_without_captions: int


def check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise InputError(f"kinds must be distinct names among {', '.join(KINDS)}; got {list(kinds)}")


def _kind_texts(record: ImageText, kind: str) -> list[str]:
    return {"short": record.captions, "long": record.long_captions, "translated": record.translated}[kind]


def caption_table(records: Sequence[ImageText], kinds: Sequence[str]) -> CaptionTable:
    check_kinds(kinds)
    digest = hashlib.sha256()
    texts: list[str] = []
    ends = np.zeros(len(records) * len(KINDS) + 1, dtype=np.int64)
    skipped = without = 0
    for i, record in enumerate(records):
        start = len(texts)
        for k, kind in enumerate(KINDS):
            for text in _kind_texts(record, kind) if kind in kinds else ():
                if not text.strip():
                    skipped += 1
                    continue
                texts.append(text)
                digest.update(json.dumps([i, kind, text]).encode() + b"\n")
            ends[i * len(KINDS) + k + 1] = len(texts)
        without += int(len(texts) == start)
    counts = np.diff(ends)
    return CaptionTable(
        texts=texts,
        image=np.repeat(np.arange(len(records), dtype=np.int32), counts.reshape(-1, len(KINDS)).sum(axis=1)),
        kind=np.repeat(np.tile(np.arange(len(KINDS), dtype=np.uint8), len(records)), counts),
        offsets=ends,
        hash=digest.hexdigest(),
        skipped_empty=skipped,
        images_without_captions=without,
    )


def caption_hash(records: Sequence[ImageText], kinds: Sequence[str]) -> str:
    """The caption hash a cache of these records and kinds carries in its manifest."""
    return caption_table(records, kinds).hash


def weight_hash(model_dir: str | os.PathLike) -> str:
    """A fingerprint of an encoder directory's weights and settings.

    sha256 over the name, size and sha256 of each whole safetensors file, the whole of its small config
    and tokenizer files, and, for an adapter-only directory, its local base model. The digest of each
    weight file is kept in `weight_digests.json` beside it, so each file is read once (16 GB take
    seconds at disk speed); a file whose size or mtime has changed is read again.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model directory not found: {model_dir}")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{model_dir} holds no .safetensors weights")
    digest = hashlib.sha256()
    for name, size, file_sha256 in _weight_digests(model_dir, weights):
        for part in (name.encode(), str(size).encode(), bytes.fromhex(file_sha256)):
            digest.update(len(part).to_bytes(8, "little") + part)
    for name in SMALL_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    if (model_dir / "adapter_config.json").is_file():
        try:
            base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise InputError(f"cannot read {model_dir / 'adapter_config.json'}: {err}") from None
        if base and Path(base).is_dir():
            digest.update(weight_hash(base).encode())
    return digest.hexdigest()


def _weight_digests(model_dir: Path, weights: list[Path]) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each weight file: from `DIGESTS_FILE` where its size and mtime still match."""
    stored_file = model_dir / DIGESTS_FILE
    try:
        stored = json.loads(stored_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    entries = {}
    for path in weights:
        stat = path.stat()
        entry = stored.get(path.name)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns and isinstance(entry.get("sha256"), str)):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _file_digest(path)}
        entries[path.name] = entry
    if entries != stored:
        try:
            atomic_write_json(stored_file, entries)
        except OSError:  # a read-only directory: the digests are simply computed again next time
            pass
    return [(name, entry["size"], entry["sha256"]) for name, entry in entries.items()]


def _file_digest(path: Path) -> str:
    """sha256 of a whole safetensors file (header and tensor data), streamed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > min(size - 8, MAX_HEADER):
            raise InputError(f"{path} is not a valid safetensors file (header of {header_size} bytes)")
        f.seek(0)
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_name(index: int, key: str) -> str:
    return f"shard-{index:05d}-{key}.npy"


def shard_done(path: Path, rows: int, dim: int, dtype: str) -> bool:
    """Whether `path` holds a finished shard of this shape and dtype."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.shape == (rows, dim) and array.dtype == np.dtype(dtype)


def write_rows(out_dir: Path, table: CaptionTable) -> None:
    for name, array in (("image", table.image), ("kind", table.kind), ("offsets", table.offsets)):
        atomic_save_npy(out_dir / ROW_FILES[name], array)


def cache_files(out_dir: Path) -> list[Path]:
    """Every file a cache build leaves in `out_dir`, temporary files of a killed build included."""
    def ours(name: str) -> bool:
        if name.startswith(".") and name.endswith(".tmp"):
            return name[1:].startswith(("shard-", MANIFEST, *ROW_FILES.values()))
        return name in (MANIFEST, *ROW_FILES.values()) or (name.startswith("shard-") and name.endswith(".npy"))

    return sorted(path for path in out_dir.iterdir() if ours(path.name)) if out_dir.is_dir() else []


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{cache_dir} is not an embedding cache: {MANIFEST} is missing "
                         "(build one with `llm2clip embed`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}; {REBUILD}") from None
    if not isinstance(manifest, dict) or any(key not in manifest for key in MANIFEST_KEYS):
        missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
        raise InputError(f"{path} lacks {', '.join(missing)}; {REBUILD}")
    if manifest["format"] != FORMAT:
        raise InputError(f"{path} has cache format {manifest['format']}, this version reads {FORMAT}; rebuild it")
    return manifest


class EmbeddingCache:
    """Read access to a cache directory; shards are memory-mapped when first needed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._shards: dict[int, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def kinds(self) -> list[str]:
        return self.manifest["kinds"]

    @property
    def num_images(self) -> int:
        return self.manifest["images"]

    def __len__(self) -> int:
        return self.manifest["captions"]

    @property
    def row_image(self) -> np.ndarray:
        """int32 [rows]: the image index of every row."""
        return self._row_file("image")

    @property
    def row_kind(self) -> np.ndarray:
        """uint8 [rows]: the kind of every row, as an index into KINDS."""
        return self._row_file("kind")

    def rows(self, image_index: int, kind: str) -> np.ndarray:
        """Row ids (int64) of image `image_index`'s captions of `kind`, in dataset order."""
        if kind not in self.kinds:
            raise InputError(f"cache {self.path} holds kinds {', '.join(self.kinds)}, not '{kind}'")
        if not 0 <= image_index < self.num_images:
            raise IndexError(f"image index {image_index} out of range for {self.num_images} images")
        at = image_index * len(KINDS) + KINDS.index(kind)
        offsets = self._row_file("offsets")
        return np.arange(offsets[at], offsets[at + 1], dtype=np.int64)

    def embeddings(self, rows: Sequence[int] | np.ndarray, dtype: str | np.dtype | None = None) -> np.ndarray:
        """[len(rows), dim] embeddings of the given row ids, in the stored dtype unless `dtype` is given."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row ids must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self.dim), dtype=dtype or self.dtype)
        size = self.manifest["shard_size"]
        shard_of = rows // size
        for shard in np.unique(shard_of):
            pick = shard_of == shard
            out[pick] = self._shard(int(shard))[rows[pick] - shard * size]
        return out

    def missing(self) -> list[str]:
        """Files of a complete cache that are absent or unfinished (shards of the wrong shape count)."""
        m = self.manifest
        missing = [name for name in ROW_FILES.values() if not (self.path / name).is_file()]
        missing += [s["file"] for s in m["shards"]
                    if not shard_done(self.path / s["file"], s["rows"], m["dim"], m["dtype"])]
        return missing

    def validate(self, dataset_path: str | os.PathLike, split: str | None, records: Sequence[ImageText],
                 encoder_dir: str | os.PathLike | None = None) -> None:
        """Raise InputError unless this cache is complete and was built from `records` (and `encoder_dir`)."""
        m = self.manifest
        source = f"{m['dataset']} (split {m['split']}, {m['images']} images)"
        table = caption_table(records, m["kinds"])
        here = f"{dataset_path} (split {split}, {len(records)} images)"
        if len(table.texts) != m["captions"]:
            raise InputError(
                f"cache {self.path} was built for another dataset: caption count differs: it holds {m['captions']} "
                f"captions ({', '.join(m['kinds'])}) of {source}, while {here} has {len(table.texts)}; "
                "build a cache for this dataset with `llm2clip embed`"
            )
        if table.hash != m["caption_hash"]:
            raise InputError(
                f"cache {self.path} was built for another dataset: caption hash differs ({m['caption_hash'][:12]} "
                f"for {source}, {table.hash[:12]} for {here}) although both have {m['captions']} captions; "
                "build a cache for this dataset with `llm2clip embed`"
            )
        if encoder_dir is not None:
            weights = weight_hash(encoder_dir)
            if weights != m["weight_hash"]:
                raise InputError(
                    f"cache {self.path} was built with another encoder or encoder settings: the fingerprint of weights "
                    f"and settings differs ({m['encoder']} had "
                    f"{m['weight_hash'][:12]}, {encoder_dir} has {weights[:12]}); rebuild the cache with "
                    f"`llm2clip embed --model {encoder_dir}`"
                )
        missing = self.missing()
        if not m["complete"] or missing:
            what = "not marked complete"
            if missing:
                what = f"{len(missing)} file(s) missing or unfinished, e.g. {', '.join(missing[:3])}"
            split_arg = f"--split {m['split']}" if m["split"] is not None else "split=null"
            raise InputError(
                f"cache {self.path} is incomplete ({what}); rerun `llm2clip embed --model {m['encoder']} "
                f"--data {m['dataset']} {split_arg} --out {self.path}` to finish it"
            )

    def _row_file(self, name: str) -> np.ndarray:
        if name not in self._rows:
            path = self.path / ROW_FILES[name]
            if not path.is_file():
                raise InputError(f"cache {self.path} is incomplete ({path.name} is missing); rerun `llm2clip embed`")
            self._rows[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._rows[name]

    def _shard(self, index: int) -> np.ndarray:
        if index not in self._shards:
            entry = self.manifest["shards"][index]
            path = self.path / entry["file"]
            if not shard_done(path, entry["rows"], self.dim, self.manifest["dtype"]):
                raise InputError(f"cache {self.path} is incomplete ({entry['file']} is missing or unfinished); "
                                 "rerun `llm2clip embed`")
            self._shards[index] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._shards[index]
