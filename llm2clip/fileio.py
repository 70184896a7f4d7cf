"""Atomic writes: a reader (or a rerun after a kill) sees the old file or directory or the new one, never half.

A file is written to `.NAME.PID.tmp` beside it and renamed over it; a directory is filled as a hidden
temporary sibling and swapped in. A killed job leaves at most such a hidden temporary behind. What is
swapped in gets the modes of a plain mkdir or open under the umask, though temporaries (and the files
some libraries write) start private.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _write(Path(path), lambda f: np.save(f, array, allow_pickle=False))


def _write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer per file and process
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path` to fill; it replaces `path` on success and is deleted on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` with umask modes; an existing `dst` is moved aside first and deleted only after the swap."""
    umask_modes(src)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old)


def umask_modes(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir or open would: 0o777 or 0o666, less the umask.

    Files with an execute bit keep it (0o777 less the umask); links are left alone.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~umask)
