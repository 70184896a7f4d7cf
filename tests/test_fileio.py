"""Atomic writes: the new content or the old one, never a partial file, and no temporaries left behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from llm2clip.fileio import atomic_dir, atomic_save_npy, atomic_write_json, atomic_write_text


def file_states(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root`, with its mtime and bytes: equal states mean nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


class Interrupted(Exception):
    pass


def test_files_are_replaced_whole(tmp_path):
    atomic_write_text(tmp_path / "deep" / "notes.md", "première ligne\n")
    assert (tmp_path / "deep" / "notes.md").read_text(encoding="utf-8") == "première ligne\n"
    atomic_write_json(tmp_path / "report.json", {"name": "carré", "values": [1, 2]})
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == {"name": "carré", "values": [1, 2]}
    atomic_write_json(tmp_path / "compact.json", [1, 2], indent=None)
    assert (tmp_path / "compact.json").read_text() == "[1, 2]\n"
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    atomic_save_npy(tmp_path / "array.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "array.npy", allow_pickle=False), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["array.npy", "compact.json", "deep", "report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "array.npy"
    atomic_save_npy(path, np.zeros(3))
    with pytest.raises(ValueError):  # object arrays would need pickle, which is refused
        atomic_save_npy(path, np.array([{"a": 1}], dtype=object))
    np.testing.assert_array_equal(np.load(path), np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["array.npy"]


def test_a_directory_is_swapped_in_on_success_only(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.") and not any(tmp.iterdir())
        (tmp / "weights.bin").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    with pytest.raises(Interrupted), atomic_dir(out) as tmp:
        (tmp / "half.bin").write_bytes(b"")
        raise Interrupted
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    with atomic_dir(tmp_path / "new" / "tower") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "new" / "tower" / "config.json").is_file()


def test_a_swapped_in_directory_gets_umask_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "weights.safetensors").write_bytes(b"w")
            (tmp / "sub" / "weights.safetensors").chmod(0o600)  # as a library's private temporary
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(umask)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "model",
                                                                                 *(tmp_path / "model").rglob("*")]}
    assert modes == {"model": 0o755, "model/sub": 0o755, "model/sub/weights.safetensors": 0o644,
                     "model/run.sh": 0o755}
