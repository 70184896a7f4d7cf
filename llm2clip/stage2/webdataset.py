"""WebDataset-style tar shards, read with the standard library's `tarfile` as an IterableDataset.

A shard is a tar whose members group into samples by key: the member path up to the first dot of its
base name (`0001.jpg` and `0001.json` make sample `0001`); a sample's members are adjacent. A sample
needs an image (jpg, jpeg, png or webp) and captions: a `txt` member (one short caption per line) or
a `json` member with the keys of the JSONL format (`captions` or `caption`, `long_caption(s)`,
`captions_fr`, `long_caption_fr`). Each epoch the shards are shuffled with the seed and dealt out to
the ranks and their DataLoader workers, so every sample is read by exactly one process. Bad samples
are skipped and counted, and the counts ride along with the next sample read.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import posixpath
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llm2clip.data.records import ImageText
from llm2clip.embed.cache import EmbeddingCache
from llm2clip.errors import InputError
from llm2clip.sampling import item_generator
from llm2clip.stage2.data import CacheRows, CaptionMix, Captions

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("no image", "unreadable captions", "not in the cache's dataset", "no caption of the caption_mix kinds",
                "corrupt image", "unreadable shard (rest skipped)")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str) -> list[Path]:
    """Shard paths from a comma-separated list of directories (their *.tar), brace ranges
    (`cc3m-{0000..0287}.tar`), globs and file paths. Every shard must exist."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        for name in _expand_ranges(part):
            if Path(name).is_dir():
                names += sorted(glob.glob(str(Path(name) / "*.tar")))
            elif glob.has_magic(name):
                names += sorted(glob.glob(name))
            else:
                names.append(name)
    missing = [name for name in names if not Path(name).is_file()]
    if missing:
        raise InputError(f"shards: {len(missing)} file(s) not found, e.g. {missing[0]} (from '{spec}')")
    if not names:
        raise InputError(f"shards: '{spec}' matches no tar file")
    return [Path(name) for name in names]


def _expand_ranges(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.groups()
    head, tail = pattern[: match.start()], pattern[match.end() :]
    numbers = (f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1))
    return [name for number in numbers for name in _expand_ranges(f"{head}{number}{tail}")]


def read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a shard, streamed in tar order."""
    key, members = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            base = posixpath.basename(member.name)
            stem, dot, extension = base.partition(".")
            if not member.isfile() or not dot or not stem:
                continue
            member_key = posixpath.join(posixpath.dirname(member.name), stem)
            if member_key != key:
                if members:
                    yield key, members
                key, members = member_key, {}
            members[extension.lower()] = tar.extractfile(member).read()
    if members:
        yield key, members


def _strings(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [item.strip() for item in items if isinstance(item, str) and item.strip()]


def sample_captions(members: dict[str, bytes]) -> Captions:
    """The captions of a sample by kind, from its json member, else its txt member (ValueError if unreadable)."""
    if "json" in members:
        entry = json.loads(members["json"].decode("utf-8"))
        if not isinstance(entry, dict):
            raise ValueError(f"caption json is a {type(entry).__name__}, not an object")
        return {
            "short": _strings(entry.get("captions")) + _strings(entry.get("caption")),
            "long": _strings(entry.get("long_captions")) + _strings(entry.get("long_caption")),
            "translated": _strings(entry.get("captions_fr")) + _strings(entry.get("long_caption_fr")),
        }
    if "txt" in members:
        return {"short": _strings(members["txt"].decode("utf-8").split("\n")), "long": [], "translated": []}
    return {}


def shard_captions(shards: Sequence[Path]) -> Iterator[Captions]:
    """The captions of every readable sample of `shards` (to train a tokenizer on)."""
    for shard in shards:
        for _, members in read_samples(shard):
            try:
                yield sample_captions(members)
            except ValueError:
                continue


def own_captions(key: str, captions: Captions) -> Captions:
    """A sample's own captions (the plain CLIP baseline tokenises them)."""
    return captions


class CacheRowsByKey:
    """The cache rows of the dataset record whose id is the sample key; None for a key not in the dataset."""

    def __init__(self, cache: EmbeddingCache, records: Sequence[ImageText]):
        self.rows = CacheRows(cache)
        self.index = {record.id: i for i, record in enumerate(records)}
        if len(self.index) != len(records):
            raise InputError("the dataset behind the cache repeats record ids, so tar sample keys cannot name records")

    def __call__(self, key: str, captions: Captions) -> Captions | None:
        index = self.index.get(key)
        return None if index is None else self.rows(index)


class ShardDataset(IterableDataset):
    """Samples of tar shards as {"image", "caption"} (plus "skipped" counts), for rank `rank` of `world_size`.

    `captions(key, own_captions)` gives the captions to draw from (texts or cache rows), or None to
    skip the sample. A buffer of `shuffle_buffer` encoded samples per worker shuffles across shards.
    """

    def __init__(self, shards: Sequence[Path], mix: CaptionMix, captions: Callable[[str, Captions], Captions | None],
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1):
        if len(shards) < world_size:
            raise InputError(f"{len(shards)} tar shard(s) cannot feed {world_size} ranks; give at least one per rank")
        self.shards = list(shards)
        self.mix = mix
        self.captions = captions
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, 1)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def assigned_shards(self) -> list[Path]:
        """This process's shards this epoch: every (world_size * workers)-th of the shuffled list."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.shards.copy()
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order[self.rank * workers + worker :: self.world_size * workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{info.id if info else 0}")
        skipped: Counter[str] = Counter()
        buffer: list[tuple[str, bytes, Any]] = []
        for encoded in self._candidates(skipped):
            buffer.append(encoded)
            if len(buffer) < self.shuffle_buffer:
                continue
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            sample = self._decode(buffer.pop(), skipped)
            if sample is not None:
                yield sample
        rng.shuffle(buffer)
        for encoded in buffer:
            sample = self._decode(encoded, skipped)
            if sample is not None:
                yield sample

    def _candidates(self, skipped: Counter[str]) -> Iterator[tuple[str, bytes, Any]]:
        """(where, image bytes, caption) of the samples that pass every check short of decoding the image."""
        for shard in self.assigned_shards():
            try:
                for key, members in read_samples(shard):
                    where = f"{shard}:{key}"
                    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    if image is None:
                        self._skip(skipped, "no image", where)
                        continue
                    try:
                        own = sample_captions(members)
                    except (ValueError, UnicodeDecodeError) as err:
                        self._skip(skipped, "unreadable captions", f"{where}: {err}")
                        continue
                    options = self.captions(key, own)
                    if options is None:
                        self._skip(skipped, "not in the cache's dataset", where)
                        continue
                    # Drawn from the sample's key, not a worker's RNG, so that a resumed run draws the same.
                    caption = self.mix.draw(options, item_generator(self.seed, self.epoch, f"{shard.name}/{key}"))
                    if caption is None:
                        self._skip(skipped, "no caption of the caption_mix kinds", where)
                        continue
                    yield where, image, caption
            except (tarfile.TarError, OSError, EOFError) as err:
                self._skip(skipped, "unreadable shard (rest skipped)", f"{shard}: {err}")

    def _decode(self, encoded: tuple[str, bytes, Any], skipped: Counter[str]) -> dict[str, Any] | None:
        where, data, caption = encoded
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            self._skip(skipped, "corrupt image", f"{where}: {err}")
            return None
        sample = {"image": rgb, "caption": caption}
        if skipped:
            sample["skipped"] = dict(skipped)
            skipped.clear()
        return sample

    @staticmethod
    def _skip(skipped: Counter[str], reason: str, where: str) -> None:
        skipped[reason] += 1
        logger.warning("skipping %s (%s)", where, reason)


class ShardLoader(DataLoader):
    """A DataLoader that passes the Trainer's `set_epoch` on to its ShardDataset."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
