"""The caption-embedding cache: round trip, resume, ranks, validation and the `llm2clip embed` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llm2clip.cli import main
from llm2clip.config import load_config
from llm2clip.data.records import ImageText, load_image_texts
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.embed import KINDS, EmbeddingCache, caption_hash, caption_table, weight_hash
from llm2clip.embed import cache as cache_module
from llm2clip.embed.build import EmbedConfig, build_cache
from llm2clip.embed.cache import DIGESTS_FILE
from llm2clip.errors import InputError
from llm2clip.text.encoder import LLMEncoder

SHARD = 64
FP16_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(SynthConfig(out_dir=out, n_train=30, n_val=4, n_test=4))
    return out


def config(encoder_dir: Path, data: Path, out: Path, **overrides) -> EmbedConfig:
    settings = {"shard_size": SHARD, "max_length": 64, **overrides}
    return EmbedConfig(model=encoder_dir, data=data, out_dir=out, **settings)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, world, encoder_dir) -> Path:
    """A full cache of the world's train split, built through the CLI."""
    out = tmp_path_factory.mktemp("cache") / "train"
    args = ["embed", "--model", str(encoder_dir), "--data", str(world), "--split", "train", "--out", str(out),
            f"shard_size={SHARD}", "max_length=64"]
    assert main(args) == 0
    return out


def shard_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.npy"))}


def count_encoded(monkeypatch) -> list[int]:
    """Record the number of texts of every encode call."""
    calls: list[int] = []
    encode = LLMEncoder.encode

    def counted(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(LLMEncoder, "encode", counted)
    return calls


def test_round_trip(cache_dir, world, encoder_dir):
    records = load_image_texts(world, "train")
    table = caption_table(records, KINDS)
    cache = EmbeddingCache(cache_dir)
    per_image = [len(r.captions) + len(r.long_captions) + len(r.translated) for r in records]
    assert len(cache) == len(table.texts) == sum(per_image)
    assert cache.dim == 32 and cache.dtype == np.float16 and cache.num_images == 30
    assert len(cache.manifest["shards"]) == -(-len(cache) // SHARD)
    assert cache.manifest["complete"] and cache.manifest["caption_hash"] == caption_hash(records, KINDS)

    encoder = LLMEncoder.from_pretrained(encoder_dir, max_length=64)
    expected = encoder.encode(table.texts, batch_size=16, show_progress=False).numpy()
    every_row = np.arange(len(cache))
    np.testing.assert_allclose(cache.embeddings(every_row).astype(np.float32), expected, **FP16_TOLERANCE)
    assert cache.embeddings([3], dtype=np.float32).dtype == np.float32

    for i in (0, 7, 29):
        for kind, texts in (("short", records[i].captions), ("long", records[i].long_captions),
                            ("translated", records[i].translated)):
            rows = cache.rows(i, kind)
            assert [table.texts[r] for r in rows] == texts
            assert (cache.row_image[rows] == i).all() and (cache.row_kind[rows] == KINDS.index(kind)).all()
    picked = np.concatenate([cache.rows(29, "long"), cache.rows(0, "short")])  # rows from the last and first shard
    np.testing.assert_array_equal(cache.embeddings(picked), cache.embeddings(every_row)[picked])
    cache.validate(world, "train", records, encoder_dir)


def test_shards_are_memory_mapped(cache_dir):
    cache = EmbeddingCache(cache_dir)
    cache.embeddings(cache.rows(1, "short"))
    assert list(cache._shards) == [0]  # only the shard that was read is opened
    assert isinstance(cache._shards[0], np.memmap)
    assert isinstance(cache.row_image, np.memmap)


def test_rerun_on_complete_cache_does_nothing(cache_dir, world, encoder_dir, capsys, monkeypatch):
    before = shard_times(cache_dir)
    calls = count_encoded(monkeypatch)
    build_cache(config(encoder_dir, world, cache_dir))
    assert "nothing to do" in capsys.readouterr().out
    assert calls == [] and shard_times(cache_dir) == before


def test_cli_prints_rate_and_destination(tmp_path, world, encoder_dir, capsys):
    out = tmp_path / "cache"
    assert main(["embed", "--model", str(encoder_dir), "--data", str(world), "--out", str(out), "max_images=3"]) == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and str(out) in printed and "skipped 0 empty caption" in printed
    assert main(["embed", "--data", str(world), "--out", str(out), "kinds=[short,bogus]"]) == 1
    assert "kinds must be distinct names among short, long, translated" in capsys.readouterr().err
    assert main(["embed", "--data", str(world), "--out", str(out), "pooling_mode=max"]) == 1
    assert "unknown pooling_mode 'max'" in capsys.readouterr().err


def test_resume_recomputes_only_missing_shards(tmp_path, world, encoder_dir, monkeypatch):
    out = tmp_path / "cache"
    build_cache(config(encoder_dir, world, out, max_images=20))
    complete = EmbeddingCache(out).embeddings(np.arange(len(EmbeddingCache(out))))
    shards = sorted(out.glob("shard-*.npy"))
    assert len(shards) == 4
    (out / "manifest.json").unlink()  # killed before the manifest was written, and during shard 1
    shards[1].unlink()
    before = shard_times(out)
    calls = count_encoded(monkeypatch)
    build_cache(config(encoder_dir, world, out, max_images=20))
    assert calls == [SHARD]
    after = shard_times(out)
    assert {name: after[name] for name in before} == before
    cache = EmbeddingCache(out)
    np.testing.assert_allclose(cache.embeddings(np.arange(len(cache))), complete, **FP16_TOLERANCE)
    assert cache.manifest["complete"]


def test_empty_captions_and_images_without_captions(tmp_path, encoder_dir, capsys):
    data = tmp_path / "captions.jsonl"
    lines = [{"image": "a.png", "captions": ["a red circle"], "long_caption": "a big red circle in the middle"},
             {"image": "b.png", "captions": ["a blue square"], "long_caption": "   "},
             {"image": "c.png", "captions": ["a green star"], "long_caption": "a small green star at the top"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "cache"
    build_cache(config(encoder_dir, data, out, split=None, kinds=["long"]))
    assert "1 of 3 image(s) have no caption of kinds long" in capsys.readouterr().out
    cache = EmbeddingCache(out)
    assert len(cache) == 2 and cache.manifest["images_without_captions"] == 1
    assert cache.rows(0, "long").tolist() == [0] and cache.rows(1, "long").size == 0
    assert cache.rows(2, "long").tolist() == [1]
    with pytest.raises(InputError, match="holds kinds long, not 'short'"):
        cache.rows(0, "short")

    lines += [{"image": f"{i}.png", "captions": ["a red circle"]} for i in range(8)]
    lines += [{"image": "d.png", "captions": [], "long_caption": "a long caption without a short one"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    build_cache(config(encoder_dir, data, tmp_path / "cache2", split=None, kinds=["short"]))
    assert "entries of " + str(data) + " left out: 1 with long captions but no short ones" in capsys.readouterr().out
    assert EmbeddingCache(tmp_path / "cache2").manifest["skipped_entries"] == {"with long captions but no short ones": 1}

    records = [ImageText(image=Path("a.png"), captions=["a cat", "", "  "], translated=["un chat"])]
    table = caption_table(records, ["short", "translated"])
    assert table.texts == ["a cat", "un chat"] and table.skipped_empty == 2
    assert table.image.tolist() == [0, 0] and table.kind.tolist() == [0, 2]


def test_caption_hash_depends_on_text_kind_and_order():
    one = ImageText(image=Path("a.png"), captions=["a cat"], long_captions=["a cat on a mat"])
    two = ImageText(image=Path("b.png"), captions=["a dog"])
    reference = caption_hash([one, two], KINDS)
    assert caption_hash([one, two], KINDS) == reference
    assert caption_hash([two, one], KINDS) != reference
    assert caption_hash([one, two], ["short"]) != reference
    swapped = ImageText(image=Path("a.png"), captions=["a cat on a mat"], long_captions=["a cat"])
    assert caption_hash([swapped, two], KINDS) != reference


def test_validate_names_what_does_not_match(cache_dir, tmp_path, world, encoder_dir, other_encoder_dir):
    cache = EmbeddingCache(cache_dir)
    records = load_image_texts(world, "train")
    with pytest.raises(InputError, match=r"another dataset: caption count differs: .* \(split val, 4 images\) has 44"):
        cache.validate(world, "val", load_image_texts(world, "val"))
    edited = [ImageText(image=r.image, captions=list(r.captions), long_captions=r.long_captions,
                        translated=r.translated) for r in records]
    edited[5].captions[0] = "a different caption"
    with pytest.raises(InputError, match="another dataset: caption hash differs .* both have 330 captions"):
        cache.validate(world, "train", edited)
    with pytest.raises(InputError, match=rf"another encoder or encoder settings: .* differs \({encoder_dir} had .*, "
                                         rf"{other_encoder_dir} has"):
        cache.validate(world, "train", records, other_encoder_dir)

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in cache_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    next(copy.glob("shard-00002-*.npy")).unlink()
    with pytest.raises(InputError, match=r"is incomplete \(1 file\(s\) missing .*shard-00002.*rerun `llm2clip embed"):
        EmbeddingCache(copy).validate(world, "train", records, encoder_dir)
    with pytest.raises(InputError, match="is incomplete"):
        EmbeddingCache(copy).embeddings([2 * SHARD])

    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read .*manifest.json"):
        EmbeddingCache(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest.json is missing"):
        EmbeddingCache(copy)


def test_weight_hash_covers_weights_and_settings(tmp_path, encoder_dir, other_encoder_dir):
    assert weight_hash(encoder_dir) == weight_hash(encoder_dir)
    assert weight_hash(encoder_dir) != weight_hash(other_encoder_dir)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in encoder_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert weight_hash(copy) == weight_hash(encoder_dir)
    (copy / "llm2vec_config.json").write_text(json.dumps({"pooling_mode": "eos_token"}))
    assert weight_hash(copy) != weight_hash(encoder_dir)
    with pytest.raises(InputError, match="holds no .safetensors weights"):
        weight_hash(tmp_path)


def save_three_tensors(folder: Path, middle: float) -> Path:
    """model.safetensors of two 2.4 MB tensors around a small one: the middle one lies past each end's first MiB."""
    folder.mkdir(exist_ok=True)
    save_file({"a": torch.zeros(600_000), "b": torch.full((16,), middle), "c": torch.ones(600_000)},
              folder / "model.safetensors")
    return folder


def test_weight_hash_reads_every_tensor(tmp_path):
    first, second = save_three_tensors(tmp_path / "first", 0.0), save_three_tensors(tmp_path / "second", 1.0)
    assert (first / "model.safetensors").stat().st_size == (second / "model.safetensors").stat().st_size
    assert weight_hash(first) != weight_hash(second)


def test_weight_hash_is_stored_beside_the_weights_and_redone_for_a_changed_file(tmp_path, monkeypatch):
    model = save_three_tensors(tmp_path / "model", 0.0)
    fingerprint = weight_hash(model)
    assert json.loads((model / DIGESTS_FILE).read_text())["model.safetensors"]["size"] > 0

    hashed: list[str] = []
    file_digest = cache_module._file_digest
    monkeypatch.setattr(cache_module, "_file_digest", lambda path: hashed.append(path.name) or file_digest(path))
    assert weight_hash(model) == fingerprint and hashed == []  # read back, not recomputed

    weights = model / "model.safetensors"
    old_mtime = weights.stat().st_mtime_ns
    save_three_tensors(model, 1.0)  # same size, other middle tensor
    os.utime(weights, ns=(old_mtime + 10**9, old_mtime + 10**9))
    changed = weight_hash(model)
    assert hashed == ["model.safetensors"] and changed != fingerprint
    assert changed == weight_hash(save_three_tensors(tmp_path / "fresh", 1.0))


def test_weight_hash_of_a_read_only_directory_is_computed_each_time(tmp_path, monkeypatch):
    model = save_three_tensors(tmp_path / "model", 0.0)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(cache_module, "atomic_write_json", refuse)
    assert weight_hash(model) == weight_hash(model)
    assert not (model / DIGESTS_FILE).exists()


def test_another_encoder_or_dataset_needs_overwrite(tmp_path, world, encoder_dir, other_encoder_dir, capsys):
    out = tmp_path / "cache"
    build_cache(config(encoder_dir, world, out, max_images=4))
    first = set(shard_times(out))
    with pytest.raises(InputError, match=rf"built differently \(encoder: the cache has {encoder_dir} .*overwrite=true"):
        build_cache(config(other_encoder_dir, world, out, max_images=4))
    with pytest.raises(InputError, match=r"captions: the cache has 44 of .* not the 55 of"):
        build_cache(config(encoder_dir, world, out, max_images=5))
    assert set(shard_times(out)) == first

    build_cache(config(other_encoder_dir, world, out, max_images=4, overwrite=True))
    assert not first & set(shard_times(out))  # the old build's shards are gone
    records = load_image_texts(world, "train")[:4]
    EmbeddingCache(out).validate(world, "train", records, other_encoder_dir)

    (out / "manifest.json").unlink()  # shards of one build, no manifest: another build must not adopt them
    with pytest.raises(InputError, match="shard\\(s\\) of another build"):
        build_cache(config(encoder_dir, world, out, max_images=4))


def read_all(out: Path) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    cache = EmbeddingCache(out)
    rows = [np.load(out / name, allow_pickle=False) for name in ("rows_image.npy", "rows_kind.npy", "rows_offsets.npy")]
    return cache.manifest, cache.embeddings(np.arange(len(cache))), rows


def assert_same_cache(out: Path, reference: Path) -> None:
    manifest, embeddings, rows = read_all(out)
    expected_manifest, expected, expected_rows = read_all(reference)
    assert manifest == expected_manifest | {"encoder": manifest["encoder"], "dataset": manifest["dataset"]}
    np.testing.assert_allclose(embeddings, expected, **FP16_TOLERANCE)
    for got, want in zip(rows, expected_rows):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_two_ranks_give_the_same_cache(tmp_path, cache_dir, world, encoder_dir):
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llm2clip.cli",
         "embed", "--model", str(encoder_dir), "--data", str(world), "--out", str(out), f"shard_size={SHARD}",
         "max_length=64"],
        check=True, env=env, timeout=300, capture_output=True, text=True,
    )
    assert "encoded 330 of 330 rows" in run.stdout and "on 2 rank(s)" in run.stdout
    assert_same_cache(out, cache_dir)


@pytest.mark.slow
def test_sigkill_then_rerun_completes_the_cache(tmp_path, world, encoder_dir):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llm2clip.cli", "embed", "--model", str(encoder_dir), "--data", str(world),
               "--out", str(out), "shard_size=8", "max_length=64"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.npy")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, "the build ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    before = shard_times(out)
    assert 1 <= len(before) < 42
    subprocess.run(command, check=True, timeout=300)
    after = shard_times(out)
    assert {name: after[name] for name in before} == before  # the shards written before the kill are kept

    reference = tmp_path / "uninterrupted"
    build_cache(config(encoder_dir, world, reference, shard_size=8))
    assert_same_cache(out, reference)
    cache = EmbeddingCache(out)
    assert not cache.missing() and len(cache) == 330
    assert np.bincount(cache.row_image, minlength=30).tolist() == [11] * 30  # every row once, image by image
    assert not list(out.glob(".*.tmp"))


def test_shipped_config_is_the_default():
    shipped = Path(__file__).resolve().parents[1] / "configs" / "tiny-embed.yaml"
    assert load_config(EmbedConfig, shipped) == EmbedConfig()


# --- whitening statistics ------------------------------------------------------------------------

def weighted_reference(cache: EmbeddingCache, kind_weights: dict[str, float], relative_eps: float):
    """Mean and ZCA matrix from every row at once, in numpy (each kind's rows share its weight)."""
    x = cache.embeddings(np.arange(len(cache)), dtype=np.float64)
    kinds = np.asarray(cache.row_kind)
    w = np.zeros(len(cache))
    for kind, weight in kind_weights.items():
        pick = kinds == KINDS.index(kind)
        w[pick] = weight / pick.sum()
    w /= w.sum()
    mean = w @ x
    covariance = (x - mean).T @ ((x - mean) * w[:, None])
    values, vectors = np.linalg.eigh(covariance)
    values = values.clip(min=0)
    return mean, vectors @ np.diag((values + relative_eps * values[-1]) ** -0.5) @ vectors.T


def test_whitening_matches_a_one_pass_reference(cache_dir, monkeypatch):
    import llm2clip.embed.whitening as whitening

    monkeypatch.setattr(whitening, "CHUNK_ROWS", 7)  # many chunks across shard borders
    cache = EmbeddingCache(cache_dir)
    weights = {"short": 1.0, "long": 3.0}
    mean, matrix = whitening.fit_whitening(cache, weights, relative_eps=1e-3)
    ref_mean, ref_matrix = weighted_reference(cache, weights, 1e-3)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(matrix.numpy(), ref_matrix, rtol=1e-4, atol=1e-4)
    # The kinds count by their weights, not by their row counts.
    kinds = np.asarray(cache.row_kind)
    rows = cache.embeddings(np.arange(len(cache)), dtype=np.float64)
    kind_mean = {k: rows[kinds == KINDS.index(k)].mean(0) for k in weights}
    np.testing.assert_allclose(mean.numpy(), 0.25 * kind_mean["short"] + 0.75 * kind_mean["long"], atol=1e-5)


def test_whitened_rows_have_unit_covariance_where_they_vary(cache_dir):
    import llm2clip.embed.whitening as whitening

    cache = EmbeddingCache(cache_dir)
    mean, matrix = whitening.fit_whitening(cache, {"short": 1.0}, relative_eps=1e-9)
    short = cache.embeddings(np.flatnonzero(np.asarray(cache.row_kind) == KINDS.index("short")), dtype=np.float64)
    white = (short - mean.double().numpy()) @ matrix.double().numpy()
    covariance = white.T @ white / len(white)
    eigenvalues = np.linalg.eigvalsh(covariance)
    rank = np.linalg.matrix_rank(short - short.mean(0), tol=1e-6 * np.abs(short).max())
    np.testing.assert_allclose(eigenvalues[-rank:], 1.0, atol=1e-2)  # the directions the rows span
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-4)


def test_whitening_subsamples_and_rejects_bad_input(cache_dir):
    import llm2clip.embed.whitening as whitening

    cache = EmbeddingCache(cache_dir)
    mean, matrix = whitening.fit_whitening(cache, {"short": 1.0, "long": 1.0}, 1e-3, max_rows=40, seed=3)
    assert mean.shape == (cache.dim,) and matrix.shape == (cache.dim, cache.dim)
    assert torch.allclose(matrix, matrix.T, atol=1e-5)
    again, _ = whitening.fit_whitening(cache, {"short": 1.0, "long": 1.0}, 1e-3, max_rows=40, seed=3)
    assert torch.equal(mean, again)
    with pytest.raises(InputError, match="eps must lie in"):
        whitening.fit_whitening(cache, {"short": 1.0}, relative_eps=0)
    with pytest.raises(InputError, match="no rows of the kinds short"):
        whitening.fit_whitening(cache, {"short": 0.0}, 1e-3)
