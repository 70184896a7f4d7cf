"""Stage 2: caption mix, datasets (world, JSONL, Karpathy, ShareGPT4V, tar shards), trainer runs of both
model types, resume, and every bad-input case."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_fileio import file_states
from torch.utils.data import DataLoader
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
)

from llm2clip.cli import main
from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.config import load_config
from llm2clip.data.records import load_image_texts
from llm2clip.embed.build import EmbedConfig, build_cache
from llm2clip.embed.cache import EmbeddingCache, weight_hash
from llm2clip.embed.whitening import fit_whitening
from llm2clip.errors import InputError
from llm2clip.eval.towers import load_tower
from llm2clip.losses import stage2_loss
from llm2clip.stage2.data import (
    CacheRows,
    CaptionMix,
    ImageCaptionCollator,
    RecordTexts,
    image_caption_dataset,
    train_caption_tokenizer,
)
from llm2clip.stage2.train import (
    ClampLogitScale,
    Stage2Config,
    Stage2Trainer,
    build_model,
    train_stage2,
)
from llm2clip.stage2.webdataset import (
    ShardDataset,
    expand_shards,
    own_captions,
    read_samples,
    sample_captions,
)
from llm2clip.training import training_arguments

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "vision.image_size=32", "vision.patch_size=8", "vision.hidden_size=32", "vision.num_layers=2",
    "vision.num_heads=2", "vision.intermediate_size=64", "adapter.depth=1", "adapter.hidden_dim=32",
    "projection_dim=16", "text.hidden_size=32", "text.num_layers=2", "text.num_heads=2",
    "text.intermediate_size=64", "text.vocab_size=400", "train.batch_size=4", "train.max_steps=4",
    "train.save_steps=2", "train.logging_steps=1", "train.dataloader_workers=0", "train.precision=fp32",
    "train.warmup_ratio=0.0",
]


def tiny(world: Path, cache: Path, encoder: Path | None, out: Path, *overrides: str) -> Stage2Config:
    return load_config(Stage2Config, None, [f"data={world}", f"cache={cache}", f"encoder={encoder or 'null'}",
                                            f"out_dir={out}", *TINY, *overrides])


def report(out: Path) -> dict:
    return json.loads((out / "train_report.json").read_text())


def processor(size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def png_bytes(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the caption mix -----------------------------------------------------------------------------

def test_caption_mix_follows_the_weights():
    mix = CaptionMix({"short": 0.7, "long": 0.3, "translated": 0.0})
    captions = {"short": ["s1", "s2"], "long": ["l"], "translated": ["t"]}
    generator = torch.Generator().manual_seed(0)
    drawn = Counter(mix.draw(captions, generator) for _ in range(4000))
    assert drawn["t"] == 0
    assert abs(drawn["l"] / 4000 - 0.3) < 0.03
    assert abs(drawn["s1"] - drawn["s2"]) / 4000 < 0.05  # captions of a kind are equally likely


def test_caption_mix_redraws_among_the_kinds_an_image_has():
    mix = CaptionMix({"short": 0.2, "long": 0.8})
    generator = torch.Generator().manual_seed(0)
    assert {mix.draw({"short": ["s"], "long": []}, generator) for _ in range(200)} == {"s"}
    assert mix.draw({"short": [], "translated": ["t"]}) is None  # no caption of a mixed kind
    assert mix.kinds == ["short", "long"]


@pytest.mark.parametrize("weights, message", [
    ({"short": 1, "german": 1}, r"unknown kind\(s\) german"),
    ({"short": -1, "long": 1}, "caption_mix.short must be a number >= 0"),
    ({"short": 0, "long": 0}, "no kind a positive weight"),
])
def test_caption_mix_rejects_bad_weights(weights, message):
    with pytest.raises(InputError, match=message):
        CaptionMix(weights)


# --- map-style datasets --------------------------------------------------------------------------

def write_sharegpt(world: Path, out: Path) -> Path:
    records = load_image_texts(world, "train")
    entries = [{"id": r.id, "image": str(r.image), "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."},
        {"from": "gpt", "value": f"{r.captions[0]}. {r.long_captions[0]}"}]} for r in records]
    out.write_text(json.dumps(entries))
    return out


def write_jsonl(world: Path, out: Path) -> Path:
    lines = [json.dumps({"image": str(r.image), "captions": r.captions, "long_caption": r.long_captions[0]})
             for r in load_image_texts(world, "train")]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("layout", ["world", "jsonl", "karpathy", "sharegpt4v"])
def test_every_record_format_feeds_a_batch(small_world, tmp_path, layout):
    data = {
        "world": lambda: small_world,
        "jsonl": lambda: write_jsonl(small_world, tmp_path / "captions.jsonl"),
        "karpathy": lambda: small_world / "karpathy.json",  # short captions only
        "sharegpt4v": lambda: write_sharegpt(small_world, tmp_path / "sharegpt4v.json"),
    }[layout]()
    records = load_image_texts(data, "train" if layout != "sharegpt4v" else None)
    mix = CaptionMix({"short": 0.5, "long": 0.5})
    dataset, skips, _ = image_caption_dataset(records, RecordTexts(records), mix)
    assert len(dataset) == 20 and not skips
    tokenizer = train_caption_tokenizer((t for r in records for t in r.captions + r.long_captions), 300, 77)
    collate = ImageCaptionCollator(processor(32), tokenizer=tokenizer)
    batch = collate([dataset[0, i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 77
    assert (batch["input_ids"] == tokenizer.eos_token_id).any(dim=1).all()  # truncation keeps the end token


def test_cache_rows_feed_embeddings(small_world, cache_dir):
    records = load_image_texts(small_world, "train")
    cache = EmbeddingCache(cache_dir)
    dataset, _, _ = image_caption_dataset(records, CacheRows(cache), CaptionMix({"long": 1.0}))
    sample = dataset[0, 3]
    assert int(cache.row_image[sample["caption"]]) == 3 and cache.row_kind[sample["caption"]] == 1  # its long caption
    batch = ImageCaptionCollator(processor(32), cache=cache)([dataset[0, i] for i in range(3)])
    assert batch["llm_embeddings"].shape == (3, cache.dim)


def test_caption_draws_derive_from_seed_epoch_and_index(small_world):
    records = load_image_texts(small_world, "train")
    mix = CaptionMix({"short": 0.5, "long": 0.5})
    dataset, _, _ = image_caption_dataset(records, RecordTexts(records), mix, seed=3)
    again, _, _ = image_caption_dataset(records, RecordTexts(records), mix, seed=3)
    torch.manual_seed(0)  # the global RNG plays no part
    draws = [dataset[epoch, 5]["caption"] for epoch in range(12)]
    torch.manual_seed(1)
    assert [again[epoch, 5]["caption"] for epoch in reversed(range(12))] == draws[::-1]
    assert len(set(draws)) > 1  # a fresh draw each epoch


def test_bad_images_and_captionless_images_are_counted_and_skipped(small_world, tmp_path):
    records = load_image_texts(small_world, "train")[:5]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes((200, 0, 0))[:60])  # truncated PNG
    records[0].image = corrupt
    records[1].image = tmp_path / "missing.png"
    records[2].long_captions = []
    dataset, skips, examples = image_caption_dataset(records, RecordTexts(records), CaptionMix({"long": 1.0}))
    assert len(dataset) == 2
    assert skips == {"corrupt image": 1, "missing image": 1, "no caption of the caption_mix kinds": 1}
    assert "missing.png" in examples["missing image"] and "corrupt.png" in examples["corrupt image"]
    records[3].image = records[4].image = corrupt
    with pytest.raises(InputError, match="no usable image-caption pairs"):
        image_caption_dataset(records, RecordTexts(records), CaptionMix({"long": 1.0}))


def test_caption_tokenizer_is_clip_shaped_and_deterministic():
    texts = ["a red circle left of a blue square", "the crimson box is above the green triangle"] * 50
    first, second = (train_caption_tokenizer(texts, 300, 77) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()
    ids = first([" ".join(texts[:30]), "a red circle"], padding=True, truncation=True, max_length=77)["input_ids"]
    assert len(ids[0]) == 77 and ids[0][0] == first.bos_token_id and ids[0][-1] == first.eos_token_id
    assert first.eos_token_id == first.pad_token_id != 2  # CLIP pools at the first end token unless eos is 2


# --- tar shards ----------------------------------------------------------------------------------

def write_shards(world: Path, out: Path, count: int) -> list[str]:
    """The world's train images as `count` tar shards keyed by record id, plus bad samples in the last one."""
    out.mkdir(parents=True, exist_ok=True)
    records = load_image_texts(world, "train")
    keys = []
    for s in range(count):
        with tarfile.open(out / f"part-{s:03d}.tar", "w") as tar:
            members = []
            for r in records[s::count]:
                keys.append(r.id)
                text = json.dumps({"captions": r.captions, "long_caption": r.long_captions[0]}).encode()
                members += [(f"{r.id}.png", r.image.read_bytes()), (f"{r.id}.json", text)]
            if s == count - 1:
                members += [("bad-image.png", b"not a png"), ("bad-image.txt", b"a caption"),
                            ("no-image.txt", b"a caption"), ("bad-json.png", png_bytes((0, 0, 0))),
                            ("bad-json.json", b"{oops"), ("txt-only.png", png_bytes((9, 9, 9))),
                            ("txt-only.txt", b"first caption\nsecond caption\n")]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


def caption_is_key(key, captions):
    return {"short": [key]}


def test_shards_split_across_ranks_and_workers_without_overlap(small_world, tmp_path):
    keys = write_shards(small_world, tmp_path / "shards", count=5)
    shards = expand_shards(str(tmp_path / "shards"))
    mix = CaptionMix({"short": 1.0})
    seen, skipped = [], Counter()
    for rank in range(2):
        dataset = ShardDataset(shards, mix, caption_is_key, seed=3, shuffle_buffer=4, rank=rank, world_size=2)
        for sample in dataset:
            seen.append((rank, sample["caption"]))
            skipped.update(sample.get("skipped", {}))
    by_rank = [{key for r, key in seen if r == rank} for rank in range(2)]
    assert not by_rank[0] & by_rank[1]
    assert len(seen) == len(keys) + 1 and by_rank[0] | by_rank[1] == set(keys) | {"txt-only"}
    assert sum(skipped.values()) <= 3  # the three bad samples; counts ride on the samples read after them

    dataset = ShardDataset(shards, mix, caption_is_key, seed=3, shuffle_buffer=4)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    assert sorted(s["caption"] for s in loader) == sorted(set(keys) | {"txt-only"})


def test_shard_caption_draws_derive_from_seed_epoch_and_key(small_world, tmp_path):
    write_shards(small_world, tmp_path / "shards", count=2)
    shards = expand_shards(str(tmp_path / "shards"))
    dataset = ShardDataset(shards, CaptionMix({"short": 1.0, "long": 1.0}), own_captions, seed=3, shuffle_buffer=4)

    def captions(global_seed: int) -> list:
        torch.manual_seed(global_seed)  # as a DataLoader worker's RNG would be, differently after a resume
        return [sample["caption"] for sample in dataset]

    assert captions(0) == captions(1)


def test_shard_samples_and_their_skips(small_world, tmp_path):
    write_shards(small_world, tmp_path / "shards", count=1)
    (shard,) = expand_shards(str(tmp_path / "shards" / "part-{000..000}.tar"))
    samples = dict(read_samples(shard))
    assert sample_captions(samples["txt-only"]) == {
        "short": ["first caption", "second caption"], "long": [], "translated": []}
    with pytest.raises(ValueError):
        sample_captions(samples["bad-json"])
    dataset = ShardDataset([shard], CaptionMix({"short": 1.0}), lambda key, own: own, shuffle_buffer=1)
    skipped = sum((Counter(s.get("skipped", {})) for s in dataset), Counter())
    assert skipped == {"corrupt image": 1, "no image": 1, "unreadable captions": 1}


def test_expand_shards_forms_and_errors(tmp_path):
    for name in ("a-00.tar", "a-01.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    listed = expand_shards(f"{tmp_path}/a-{{00..01}}.tar,{tmp_path}/b.tar")
    assert [p.name for p in listed] == ["a-00.tar", "a-01.tar", "b.tar"]
    assert [p.name for p in expand_shards(f"{tmp_path}/a-*.tar")] == ["a-00.tar", "a-01.tar"]
    with pytest.raises(InputError, match="not found"):
        expand_shards(f"{tmp_path}/a-{{00..02}}.tar")
    with pytest.raises(InputError, match="matches no tar"):
        expand_shards(f"{tmp_path}/c-*.tar")
    with pytest.raises(InputError, match="cannot feed 4 ranks"):
        ShardDataset(expand_shards(str(tmp_path)), CaptionMix({"short": 1}), caption_is_key, world_size=4)


# --- training runs -------------------------------------------------------------------------------

def test_llm2clip_run_writes_outputs_and_resumes(small_world, cache_dir, encoder_dir, tmp_path, capsys):
    out = tmp_path / "llm2clip"
    train_stage2(tiny(small_world, cache_dir, encoder_dir, out))
    first = report(out)
    assert first["steps"] == 4 and first["samples_per_s"] > 0 and first["skipped"] == {}
    assert [e["step"] for e in first["loss_curve"]] == [1, 2, 3, 4]
    assert "20 of 20 images usable; skipped nothing" in capsys.readouterr().out

    model = AutoModel.from_pretrained(out / "final")
    assert isinstance(model, LLM2CLIPModel)
    assert model.config.text_encoder_name_or_path == str(encoder_dir.resolve())
    cache = EmbeddingCache(cache_dir)
    assert model.config.text_encoder_fingerprint == cache.manifest["weight_hash"] == weight_hash(encoder_dir)
    assert (model.config.text_encoder_pooling_mode, model.config.text_encoder_max_length) == (
        cache.manifest["pooling_mode"], cache.manifest["max_length"])
    assert model.config.text_embed_dim == cache.dim
    mean, matrix = fit_whitening(cache, {"short": 0.5, "long": 0.5}, Stage2Config().adapter.whiten_eps)  # the defaults
    torch.testing.assert_close(model.text_adapter.input_mean, mean)
    torch.testing.assert_close(model.text_adapter.input_whitening, matrix)
    assert AutoImageProcessor.from_pretrained(out / "final").crop_size["height"] == 32
    tower = CLIPVisionModel.from_pretrained(out / "vision_tower")
    torch.testing.assert_close(tower.state_dict()["embeddings.patch_embedding.weight"],
                               model.vision_model.state_dict()["embeddings.patch_embedding.weight"])
    assert (out / "vision_tower" / "preprocessor_config.json").is_file()
    assert not (out / "final" / "training_args.bin").exists()

    # A rerun with more steps resumes from the last checkpoint and extends the same loss curve.
    train_stage2(tiny(small_world, cache_dir, encoder_dir, out, "train.max_steps=6"))
    second = report(out)
    assert second["resumed_from_step"] == 4 and second["steps_this_run"] == 2 and second["steps"] == 6
    assert [e["step"] for e in second["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert second["loss_curve"][:4] == first["loss_curve"]


@pytest.mark.parametrize("model_type", ["llm2clip", "clip"])
def test_rerun_of_a_finished_run_changes_nothing(small_world, cache_dir, encoder_dir, tmp_path, capsys, model_type):
    out = tmp_path / model_type
    # 20 images in batches of 4: 5 steps an epoch, so the Trainer alone would resume checkpoint-4 into step 5.
    config = tiny(small_world, cache_dir, encoder_dir, out, f"model_type={model_type}")
    first = train_stage2(config)
    before = file_states(out)
    capsys.readouterr()

    assert train_stage2(config) == first
    assert capsys.readouterr().out.strip() == f"stage2: already finished (4 steps) in {out}; nothing to do"
    assert file_states(out) == before

    # More steps: only the extra ones train, and the runtime is the total over both runs.
    second = train_stage2(tiny(small_world, cache_dir, encoder_dir, out, f"model_type={model_type}",
                               "train.max_steps=6"))
    assert (second["resumed_from_step"], second["steps_this_run"], second["steps"]) == (4, 2, 6)
    assert second["train_runtime_s"] == pytest.approx(first["train_runtime_s"] + second["runtime_this_run_s"],
                                                      abs=0.11)


def test_outputs_are_shareable_and_survive_moving_the_runs_tree(small_world, encoder_dir, other_encoder_dir,
                                                                tmp_path):
    runs = tmp_path / "a" / "runs"
    shutil.copytree(encoder_dir, runs / "encoder")
    build_cache(EmbedConfig(model=runs / "encoder", data=small_world, out_dir=runs / "cache", max_length=64,
                            dtype="float32"))
    umask = os.umask(0o022)
    try:
        train_stage2(tiny(small_world, runs / "cache", runs / "encoder", runs / "stage2"))
    finally:
        os.umask(umask)
    for folder in ("vision_tower", "final"):
        path = runs / "stage2" / folder
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, folder
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {
            p.name: 0o644 for p in path.iterdir()}, folder

    moved = tmp_path / "b" / "runs"
    moved.parent.mkdir()
    (tmp_path / "a" / "runs").rename(moved)
    tower = load_tower(moved / "stage2" / "final", device="cpu")
    assert tower.text_features(["a red circle"]).shape == (1, 16)

    shutil.rmtree(moved / "encoder")
    shutil.copytree(other_encoder_dir, moved / "encoder")  # another encoder at the same place
    with pytest.raises(InputError, match="trained on the embeddings of an encoder with fingerprint"):
        load_tower(moved / "stage2" / "final", device="cpu")


def test_clip_baseline_run(small_world, tmp_path, capsys):
    records = load_image_texts(small_world, "train")
    records[0].image.rename(records[0].image.with_suffix(".moved"))  # one missing image, counted and skipped
    try:
        out = tmp_path / "clip"
        train_stage2(tiny(small_world, tmp_path / "no-cache", None, out, "model_type=clip"))
    finally:
        records[0].image.with_suffix(".moved").rename(records[0].image)
    result = report(out)
    assert result["steps"] == 4 and result["skipped"] == {"missing image": 1} and result["images"] == 19
    assert "skipped 1 missing image" in capsys.readouterr().out

    model = CLIPModel.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.max_position_embeddings == 77 == tokenizer.model_max_length
    assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.image_size == 32
    tokens = tokenizer([records[0].long_captions[0]] * 2, truncation=True, max_length=77, return_tensors="pt")
    features = model.get_text_features(**tokens)
    assert getattr(features, "pooler_output", features).shape[-1] == 16
    tower = CLIPVisionModel.from_pretrained(out / "vision_tower")
    torch.testing.assert_close(tower.state_dict()["post_layernorm.weight"], model.vision_model.post_layernorm.weight)


def test_entries_left_out_of_the_data_file_are_in_the_summary_and_the_report(small_world, tmp_path, capsys):
    data = write_jsonl(small_world, tmp_path / "captions.jsonl")
    image = load_image_texts(small_world, "train")[0].image
    with data.open("a") as f:  # long captions but no short ones: left out, and counted
        f.write(json.dumps({"image": str(image), "captions": [], "long_caption": "a long caption"}) + "\n")
    out = tmp_path / "clip"
    train_stage2(tiny(data, tmp_path / "no-cache", None, out, "model_type=clip", "train.max_steps=1",
                      "train.save_steps=1"))
    assert report(out)["skipped"] == {"with long captions but no short ones": 1}
    printed = capsys.readouterr().out
    assert "20 of 20 images usable; skipped 1 with long captions but no short ones" in printed


@pytest.mark.parametrize("model_type", ["llm2clip", "clip"])
def test_run_on_tar_shards(small_world, cache_dir, encoder_dir, tmp_path, model_type):
    write_shards(small_world, tmp_path / "shards", count=2)
    out = tmp_path / "run"
    train_stage2(tiny(small_world, cache_dir, encoder_dir, out, f"shards={tmp_path / 'shards'}",
                      f"model_type={model_type}", "train.max_steps=2", "shuffle_buffer=4"))
    result = report(out)
    assert result["steps"] == 2 and result["images"] is None
    # llm2clip also skips bad-json and txt-only: they are not records of the cache's dataset
    assert set(result["skipped"]) <= {"not in the cache's dataset", "corrupt image", "no image", "unreadable captions"}
    if model_type == "clip":  # its BPE was trained on the shards' own captions
        assert AutoTokenizer.from_pretrained(out / "final").tokenize(" hexagon") == ["Ġhexagon"]


@pytest.mark.slow
def test_two_ranks_split_the_shards(small_world, cache_dir, encoder_dir, tmp_path):
    write_shards(small_world, tmp_path / "shards", count=4)
    out = tmp_path / "ranks"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm2clip.cli", "stage2",
            "--data", str(small_world), "--cache", str(cache_dir), "--encoder", str(encoder_dir), "--out", str(out),
            "--shards", str(tmp_path / "shards"), *TINY, "train.max_steps=3", "shuffle_buffer=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    result = report(out)
    assert result["steps"] == 3 and result["global_batch"] == 8  # 4 per rank, 2 ranks in one DDP group
    assert isinstance(AutoModel.from_pretrained(out / "final"), LLM2CLIPModel)


def test_logit_scale_is_clamped_after_each_step():
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision, text_embed_dim=8, adapter_hidden_dim=8, adapter_depth=0,
                                         projection_dim=8))
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    ClampLogitScale(math.log(100)).on_step_end(None, None, None, model=model)
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)


@pytest.mark.parametrize("model_type, loss, scale, bias", [
    ("llm2clip", "clip", 1 / 0.07, None), ("llm2clip", "siglip", 10.0, -10.0), ("clip", "clip", 1 / 0.07, None)])
def test_a_new_stage2_model_starts_at_its_losss_scale_and_bias(model_type, loss, scale, bias):
    config = load_config(Stage2Config, None, [f"model_type={model_type}", f"loss={loss}", *TINY])
    tokenizer = train_caption_tokenizer(["a red circle", "a blue square"], 300, 77) if model_type == "clip" else None
    model = build_model(config, 8, tokenizer)
    assert model.logit_scale.exp().item() == pytest.approx(scale, rel=1e-6)
    assert getattr(model, "logit_bias", None) is None if bias is None else model.logit_bias.item() == bias


def test_the_trainer_computes_the_models_own_loss(tmp_path):
    """The trainer's loss (through the features) equals the model's forward loss: one loss, one clamp."""
    config = load_config(Stage2Config, None, ["loss=siglip", *TINY])
    model = build_model(config, 8, None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(9.0)  # past the clamp
        model.logit_bias.fill_(-3.0)
    trainer = Stage2Trainer(model=model, args=training_arguments(config.train, tmp_path),
                            loss=stage2_loss(config.loss))
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "llm_embeddings": torch.randn(4, 8)}
    with torch.no_grad():
        expected = model(**batch, return_loss=True).loss
        assert torch.allclose(trainer.compute_loss(model, dict(batch)), expected)


# --- bad input -----------------------------------------------------------------------------------

def test_cache_of_another_encoder(small_world, cache_dir, other_encoder_dir, tmp_path):
    with pytest.raises(InputError, match="built with another encoder"):
        train_stage2(tiny(small_world, cache_dir, other_encoder_dir, tmp_path / "out"))


def test_cache_of_another_dataset(small_world, cache_dir, encoder_dir, tmp_path):
    with pytest.raises(InputError, match="built for another dataset"):
        train_stage2(tiny(small_world, cache_dir, encoder_dir, tmp_path / "out", "max_images=10"))


def test_adapter_dim_that_does_not_match_the_cache(small_world, cache_dir, encoder_dir, tmp_path):
    with pytest.raises(InputError, match="adapter.input_dim is 99 but .* holds 32-dim embeddings"):
        train_stage2(tiny(small_world, cache_dir, encoder_dir, tmp_path / "out", "adapter.input_dim=99"))


def test_caption_kind_the_cache_lacks(small_world, encoder_dir, tmp_path):
    short_only = tmp_path / "short-cache"
    build_cache(EmbedConfig(model=encoder_dir, data=small_world, out_dir=short_only, kinds=["short"], max_length=64))
    with pytest.raises(InputError, match="caption_mix draws long captions but cache .* holds only short"):
        train_stage2(tiny(small_world, short_only, encoder_dir, tmp_path / "out"))


@pytest.mark.parametrize("overrides, message", [
    (["cache={tmp}/nothing"], "manifest.json is missing"),
    (["encoder={tmp}/gone"], "encoder .*gone not found; set encoder=null"),
    (["model_type=clip", "loss=siglip"], "baseline trains with loss: clip"),
    (["caption_mix={{short: 1, klingon: 1}}"], "unknown kind"),
    (["shards={tmp}/none-*.tar"], "matches no tar file"),
    (["adapter.whiten_eps=0"], "whitening eps must lie in"),
])
def test_bad_settings(small_world, cache_dir, encoder_dir, tmp_path, overrides, message):
    config = tiny(small_world, cache_dir, encoder_dir, tmp_path / "out", *(o.format(tmp=tmp_path) for o in overrides))
    with pytest.raises(InputError, match=message):
        train_stage2(config)


def test_cli_prints_one_line_errors(small_world, cache_dir, tmp_path, capsys):
    args = ["stage2", "--data", str(small_world), "--cache", str(cache_dir), "--encoder", str(tmp_path / "gone"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("llm2clip stage2: error: encoder") and "\n" not in error


def test_configs():
    configs = ROOT / "configs"
    assert load_config(Stage2Config, configs / "tiny-stage2.yaml") == Stage2Config()
    baseline = load_config(Stage2Config, configs / "tiny-stage2-baseline.yaml")
    assert baseline == Stage2Config(model_type="clip", out_dir=Path("runs/stage2/clip"))
    real = load_config(Stage2Config, configs / "clip-l14-336-stage2.yaml")
    assert real.adapter.input_dim == 4096 and real.vision.pretrained is not None and real.train.deepspeed
