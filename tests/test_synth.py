"""The synthetic world: determinism, layout and formats, hard negatives, long and French captions."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llm2clip.cli import main
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.data.vocabulary import EN, POSITIONS
from llm2clip.errors import InputError

TINY = {"n_train": 30, "n_val": 5, "n_test": 5, "twin_prob": 0.5}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _bag(text: str) -> Counter:
    return Counter(re.findall(r"[\w-]+", text.lower()))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(SynthConfig(out_dir=out, **TINY))
    return out


def test_same_seed_same_bytes(world, tmp_path):
    generate_world(SynthConfig(out_dir=tmp_path / "again", **TINY))
    assert _files(tmp_path / "again") == _files(world)
    generate_world(SynthConfig(out_dir=tmp_path / "other", seed=1, **TINY))
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (world / "train.jsonl").read_bytes()


def test_layout_and_records(world):
    info = json.loads((world / "world.json").read_text())
    assert info["counts"] == {"train": 30, "val": 5, "test": 5}
    assert info["config"]["n_train"] == 30 and "out_dir" not in info["config"]
    for split, n in info["counts"].items():
        rows = _rows(world / f"{split}.jsonl")
        assert [r["id"] for r in rows] == [f"{split}-{i:05d}" for i in range(n)]
        for r in rows:
            assert r["image"] == f"images/{split}/{r['id']}.png"
            with Image.open(world / r["image"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
            assert len(r["captions"]) == len(r["captions_fr"]) == 4
            assert len(set(r["captions"])) == 4  # paraphrases, not copies
            assert 3 <= len(r["objects"]) <= 9
            for o in r["objects"]:
                assert POSITIONS[o["cell"][0] * 3 + o["cell"][1]] == o["position"]
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert not list(world.rglob("*.tmp"))


def test_image_pixels_show_the_objects(world):
    row = _rows(world / "train.jsonl")[0]
    with Image.open(world / row["image"]) as image:
        for o in row["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            r, g, b = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert max(r, g, b) > 150  # every shape is filled at its centre and brighter than the background


def test_twins_share_words_and_differ_in_binding(world):
    rows = {r["id"]: r for split in ("train", "val", "test") for r in _rows(world / f"{split}.jsonl")}
    pairs = [(r, rows[r["twin"]]) for r in rows.values() if r["twin"] and r["id"] < r["twin"]]
    assert {a["twin_kind"] for a, _ in pairs} == {"color", "position"}
    for a, b in pairs:
        assert a["twin_kind"] == b["twin_kind"] and b["twin"] == a["id"]
        for x, y in zip(a["captions"], b["captions"]):
            assert x != y and _bag(x) == _bag(y)  # a bag of words cannot tell them apart
        for x, y in zip(a["long_captions"], b["long_captions"], strict=True):
            assert x != y
        (a0, a1), (b0, b1) = a["objects"][:2], b["objects"][:2]
        if a["twin_kind"] == "color":
            assert (b0["color"], b1["color"]) == (a1["color"], a0["color"])
            assert (b0["shape"], b0["cell"]) == (a0["shape"], a0["cell"])
        else:
            assert (b0["color"], b0["shape"], b0["cell"]) == (a1["color"], a1["shape"], a0["cell"])
        assert a["objects"][2:] == b["objects"][2:]


def test_relation_matches_the_grid(world):
    for r in _rows(world / "train.jsonl"):
        if len(r["objects"]) < 2:
            assert r["relation"] is None
            continue
        (ra, ca), (rb, cb) = r["objects"][0]["cell"], r["objects"][1]["cell"]
        expected = {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}
        assert expected[r["relation"]]


def _clip_token_floor(text: str) -> int:
    """A lower bound on CLIP's BPE token count: its pre-tokenizer splits letters runs, single digits
    and punctuation runs, each at least one token, plus the start and end tokens."""
    return len(re.findall(r"[^\W\d_]+|\d|[^\w\s]+", text)) + 2


def test_long_captions_describe_every_object_past_77_tokens(tmp_path):
    generate_world(SynthConfig(out_dir=tmp_path, n_train=6, n_val=1, n_test=1, min_objects=6, max_objects=6))
    size_words = {w for words in EN.sizes.values() for w in words}
    for r in _rows(tmp_path / "train.jsonl"):
        assert len(r["long_captions"]) == 2 and r["long_captions"][0] != r["long_captions"][1]
        for text in r["long_captions"]:
            assert _clip_token_floor(text) > 77
            sentences = re.split(r"(?<=\.) ", text)
            kinds = ["relation" if s.startswith("The ") else "object" for s in sentences[1:]]
            assert kinds == ["object"] + ["object", "relation"] * 5  # each relation follows its second object
            last_object = text.rindex(sentences[-2])
            assert _clip_token_floor(text[:last_object]) > 77  # what the last object is lies past CLIP's cut
            for o in r["objects"]:
                assert any(w in text for w in EN.colors[o["color"]]) and any(w in text for w in EN.shapes[o["shape"]])
                assert any(w in text for w in EN.sizes[o["size"]])
        for caption in r["captions"]:  # sizes and absolute positions only in the long caption
            assert not set(re.findall(r"[\w-]+", caption.lower())) & size_words
            assert "corner" not in caption


def test_french_captions(world):
    for r in _rows(world / "train.jsonl"):
        for en, fr in zip(r["captions"] + r["long_captions"][:1], r["captions_fr"] + [r["long_caption_fr"]]):
            assert en != fr
            assert re.search(r"\b(un|une|le|la|l'|il y a)\b", fr.lower())
        # Short French captions use the same template as the English ones at the same index.
        assert len(r["captions_fr"]) == len(r["captions"])


def test_questions_have_exact_answers(world):
    for r in _rows(world / "train.jsonl"):
        objects = r["objects"]
        kinds = {(o["color"], o["shape"]): o for o in objects}
        assert {q["type"] for q in r["qa"]} >= {"count", "position", "size", "yesno"}
        for q in r["qa"]:
            words = q["question"].rstrip("?").split()
            if q["type"] == "position":
                assert kinds[(words[-2], words[-1])]["position"] == q["answer"]
            elif q["type"] == "size":
                assert kinds[(words[-2], words[-1])]["size"] == q["answer"]
            elif q["type"] == "yesno":
                assert q["answer"] == ("yes" if (words[-2], words[-1]) in kinds else "no")
            elif q["type"] == "color":
                assert [o["color"] for o in objects if o["shape"] == words[-1]] == [q["answer"]]
            elif q["question"] == "How many shapes are there?":
                assert q["answer"] == str(len(objects))


def test_public_formats(world):
    karpathy = json.loads((world / "karpathy.json").read_text())
    assert karpathy["dataset"] == "synth" and len(karpathy["images"]) == 40
    image = karpathy["images"][0]
    assert (world / image["filepath"] / image["filename"]).is_file()
    assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
    assert image["sentences"][0]["tokens"] == re.findall(r"[a-z0-9]+", image["sentences"][0]["raw"].lower())

    pretrain = json.loads((world / "llava" / "pretrain.json").read_text())
    assert len(pretrain) == 30
    for sample in pretrain:
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and (world / sample["image"]).is_file()

    finetune = json.loads((world / "llava" / "finetune.json").read_text())
    with_image = [s for s in finetune if "image" in s]
    assert len(with_image) == 30 and len(finetune) > 30  # plus text-only samples
    for sample in finetune:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum("<image>" in t["value"] for t in turns) == ("image" in sample)
        if "image" in sample:
            assert turns[0]["value"].startswith("<image>\n")

    for split in ("val", "test"):
        qa = _rows(world / "llava" / f"qa_{split}.jsonl")
        assert qa and all(set(q) == {"id", "image", "question", "answer", "type"} for q in qa)
        assert all(q["image"].startswith(f"images/{split}/") for q in qa)


def test_corpus_mixes_languages_from_train_only(world):
    lines = (world / "corpus.txt").read_text().splitlines()
    assert len(lines) == json.loads((world / "world.json").read_text())["corpus_lines"]
    assert all(line.strip() for line in lines)
    assert sum(" = " in line for line in lines) >= 30  # parallel English = French lines
    assert any(line.startswith(("Un ", "Une ", "Il y a")) for line in lines)
    held_out = {c for split in ("val", "test") for r in _rows(world / f"{split}.jsonl") for c in r["captions"] + r["long_captions"]}
    train = {r["long_captions"][0] for r in _rows(world / "train.jsonl")}
    assert train <= set(lines)
    assert not held_out & set(lines)


def test_rerun_is_idempotent_and_refuses_other_configs(world, capsys):
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*") if p.is_file()}
    generate_world(SynthConfig(out_dir=world, **TINY))
    assert "already holds this world" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in world.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="another config"):
        generate_world(SynthConfig(out_dir=world, **{**TINY, "seed": 3}))


def test_overwrite_and_incomplete_worlds(tmp_path):
    generate_world(SynthConfig(out_dir=tmp_path, n_train=6, n_val=2, n_test=2))
    generate_world(SynthConfig(out_dir=tmp_path, n_train=3, n_val=1, n_test=1, overwrite=True))
    assert len(list((tmp_path / "images" / "train").iterdir())) == 3
    (tmp_path / "corpus.txt").unlink()  # an incomplete world with the same config is rebuilt
    generate_world(SynthConfig(out_dir=tmp_path, n_train=3, n_val=1, n_test=1))
    assert (tmp_path / "corpus.txt").is_file()


@pytest.mark.parametrize("override", ["image_size=400", "max_objects=10", "min_objects=0", "n_captions=6",
                                      "twin_prob=1.5", "n_val=0"])
def test_bad_config(tmp_path, override, capsys):
    assert main(["synth", "--out", str(tmp_path / "w"), override]) == 1
    assert "synth config:" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--seed", "5", "n_train=4", "n_val=1", "n_test=1", "image_size=96"]) == 0
    assert "train 4, val 1, test 1 images (96 px)" in capsys.readouterr().out
    with Image.open(tmp_path / "images" / "val" / "val-00000.png") as image:
        assert image.size == (96, 96)
