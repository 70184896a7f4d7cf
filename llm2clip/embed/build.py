"""`llm2clip embed`: run the frozen caption encoder once over a dataset and cache its embeddings.

Captions stream shard by shard through the encoder; each shard is written as soon as it is done,
so memory stays flat in the dataset size and a killed run resumes where it stopped. Under
`torchrun` the unfinished shards are dealt out to the ranks in turn (rank r takes the r-th, the
(r+W)-th, ...), and rank 0 writes the manifest once every rank has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from llm2clip.data.records import describe_counts, load_image_texts
from llm2clip.embed.cache import (
    FORMAT, KINDS, MANIFEST, EmbeddingCache, cache_files, caption_table, check_kinds, read_manifest, shard_done,
    shard_name, weight_hash, write_rows,
)
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_save_npy, atomic_write_json
from llm2clip.text.pooling import POOLING_MODES


@dataclass
class EmbedConfig:
    model: Path = Path("runs/stage1/contrastive/merged")  # frozen caption encoder directory
    data: Path = Path("runs/world")  # world directory, .jsonl or .json
    split: str | None = "train"  # None: every split
    out_dir: Path = Path("runs/cache/train")
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # caption kinds to cache
    pooling_mode: str | None = None  # default: the encoder's own
    max_length: int | None = None  # default: the encoder's own
    batch_size: int = 64  # captions per forward pass
    shard_size: int = 2048  # captions per shard file
    dtype: Literal["float16", "float32"] = "float16"  # stored dtype
    overwrite: bool = False  # replace a cache of another encoder or dataset in out_dir
    max_images: int | None = None  # cache only the first N images


def build_cache(config: EmbedConfig) -> Path:
    """Build (or finish) the cache in `config.out_dir` and return that directory."""
    _check(config)
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        return _build(config)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _check(config: EmbedConfig) -> None:
    check_kinds(config.kinds)
    if config.pooling_mode is not None and config.pooling_mode not in POOLING_MODES:
        raise InputError(f"embed: unknown pooling_mode '{config.pooling_mode}'; use one of {', '.join(POOLING_MODES)}")
    if Path(config.out_dir).exists() and not Path(config.out_dir).is_dir():
        raise InputError(f"embed: out_dir {config.out_dir} exists and is not a directory")
    for key in ("batch_size", "shard_size", "max_length", "max_images"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise InputError(f"embed: {key} must be at least 1, got {value}")


def _build(config: EmbedConfig) -> Path:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    say = print if rank == 0 else lambda *args: None
    out = Path(config.out_dir)
    skipped_entries: Counter[str] = Counter()
    records = load_image_texts(config.data, config.split, skipped=skipped_entries)[: config.max_images]
    table = caption_table(records, config.kinds)
    if not table.texts:
        raise InputError(f"{config.data}: no non-empty captions of kinds {', '.join(config.kinds)} to cache")
    request = {
        "encoder": os.path.abspath(config.model), "weight_hash": weight_hash(config.model),
        "pooling_mode": config.pooling_mode, "max_length": config.max_length, "dtype": config.dtype,
        "dataset": os.path.abspath(config.data), "split": config.split, "images": len(records),
        "kinds": [k for k in KINDS if k in config.kinds], "captions": len(table.texts), "caption_hash": table.hash,
        "shard_size": config.shard_size,
    }
    key = _claim(out, request, config.overwrite)
    if key is None:
        say(f"embed: {out} already holds the complete cache of this encoder and dataset ({len(table.texts)} rows); "
            "nothing to do")
        return out
    entries = describe_counts(skipped_entries)
    say(f"embed: skipped {table.skipped_empty} empty caption(s); {table.images_without_captions} of {len(records)} "
        f"image(s) have no caption of kinds {', '.join(request['kinds'])}; entries of {config.data} left out: "
        f"{entries}")
    _barrier()  # every rank has decided before rank 0 changes the directory
    if rank == 0:  # keep this build's finished shards only; everything else is rewritten
        out.mkdir(parents=True, exist_ok=True)
        for path in cache_files(out):
            if not (path.name.startswith("shard-") and path.name.endswith(f"-{key}.npy")):
                path.unlink()

    from llm2clip.text.encoder import LLMEncoder  # transformers loads only when there is work

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    encoder = LLMEncoder.from_pretrained(config.model, pooling_mode=config.pooling_mode,
                                         max_length=config.max_length, device=device)
    total = len(table.texts)
    sizes = [min(config.shard_size, total - first) for first in range(0, total, config.shard_size)]
    manifest = {
        "format": FORMAT, "complete": False, "key": key, **request,
        "pooling_mode": encoder.pooling_mode, "max_length": encoder.max_length, "dim": encoder.embedding_dim,
        "skipped_empty": table.skipped_empty, "images_without_captions": table.images_without_captions,
        "skipped_entries": dict(skipped_entries),
        "kind_counts": {kind: int((table.kind == KINDS.index(kind)).sum()) for kind in request["kinds"]},
        "shards": [{"file": shard_name(s, key), "rows": n} for s, n in enumerate(sizes)],
    }
    if rank == 0:
        atomic_write_json(out / MANIFEST, manifest)
    _barrier()
    pending = _unfinished(out, key, sizes, encoder.embedding_dim, config.dtype)
    _barrier()  # every rank has seen the same finished shards before any rank writes one

    start = time.perf_counter()
    mine = pending[rank::world]
    with tqdm(total=sum(sizes[s] for s in mine), desc="embed", unit="row", disable=None if rank == 0 else True) as bar:
        for s in mine:
            texts = table.texts[s * config.shard_size : s * config.shard_size + sizes[s]]
            embeddings = encoder.encode(texts, batch_size=config.batch_size, show_progress=False).numpy()
            embeddings = embeddings.astype(config.dtype)
            if not np.isfinite(embeddings).all():
                raise InputError(f"embed: the embeddings of shard {s} overflow {config.dtype}; "
                                 "rebuild with dtype=float32")
            atomic_save_npy(out / shard_name(s, key), embeddings)
            bar.update(sizes[s])
    _barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        missing = _unfinished(out, key, sizes, encoder.embedding_dim, config.dtype)
        if missing:
            raise InputError(f"embed: shard(s) {missing[:5]} of {out} are missing; rerun `llm2clip embed`")
        write_rows(out, table)
        atomic_write_json(out / MANIFEST, {**manifest, "complete": True})
    encoded = sum(sizes[s] for s in pending)
    say(f"embed: encoded {encoded} of {len(table.texts)} rows in {seconds:.1f} s "
        f"({encoded / max(seconds, 1e-9):.1f} rows/s on {world} rank(s)); wrote {len(sizes)} shard(s) "
        f"of {encoder.embedding_dim}-dim {config.dtype} embeddings to {out}")
    return out


def _claim(out: Path, request: dict[str, Any], overwrite: bool) -> str | None:
    """The key of the build to run in `out`, or None when `out` already holds it complete.

    Refuses (unless `overwrite`) a cache or shards of another build. Only reads the directory, so
    every rank reaches the same answer.
    """
    old = _old_manifest(out, overwrite)
    differences = _differences(old, request) if old else []
    if old and not differences and old["complete"] and not EmbeddingCache(out).missing():
        return None
    if differences and not overwrite:
        raise InputError(f"{out} holds a cache built differently ({'; '.join(differences)}); "
                         "set overwrite=true to replace it, or choose another out_dir")
    key = old["key"] if old and not differences else _build_key(request)
    stale = [p for p in cache_files(out) if p.name.startswith("shard-") and not p.name.endswith(f"-{key}.npy")]
    if stale and not overwrite:
        raise InputError(f"{out} holds {len(stale)} shard(s) of another build (e.g. {stale[0].name}) and no matching "
                         f"{MANIFEST}; set overwrite=true to replace them, or choose another out_dir")
    return key


def _unfinished(out: Path, key: str, sizes: list[int], dim: int, dtype: str) -> list[int]:
    return [s for s, n in enumerate(sizes) if not shard_done(out / shard_name(s, key), n, dim, dtype)]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _old_manifest(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The manifest already in `out`, None when there is none (or an unreadable one that may be replaced)."""
    if not (out / MANIFEST).exists():
        return None
    try:
        return read_manifest(out)
    except InputError:
        if overwrite:
            return None
        raise


def _differences(old: dict[str, Any], request: dict[str, Any]) -> list[str]:
    """What makes the cache in `old` unusable for `request`, in words; empty when it matches."""
    found = []
    if old["weight_hash"] != request["weight_hash"]:
        found.append(f"encoder: the cache has {old['encoder']} (fingerprint of its weights and settings "
                     f"{old['weight_hash'][:12]}), not {request['encoder']} ({request['weight_hash'][:12]})")
    if old["caption_hash"] != request["caption_hash"]:
        found.append(f"captions: the cache has {old['captions']} of {old['dataset']} split {old['split']}, "
                     f"not the {request['captions']} of {request['dataset']} split {request['split']}")
    for key in ("kinds", "dtype", "pooling_mode", "max_length"):
        if request[key] is not None and old[key] != request[key]:
            found.append(f"{key}: {old[key]} in the cache, {request[key]} now")
    if not old["complete"] and old["shard_size"] != request["shard_size"]:
        found.append(f"shard_size: {old['shard_size']} in the unfinished cache, {request['shard_size']} now")
    return found


def _build_key(request: dict[str, Any]) -> str:
    """A short name for what decides the shards' content."""
    decisive = {k: request[k] for k in ("weight_hash", "caption_hash", "kinds", "dtype", "pooling_mode", "max_length",
                                        "shard_size")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:10]
