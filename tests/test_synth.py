"""The synthetic world: determinism, layout and formats, salient content, short captions true of the
image and entailed by the long ones, hard negatives, long and French captions."""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip.cli import main
from llm2clip.data.synth import DETAIL_PROMPT, FORMAT_VERSION, SHORT_ANSWER, SynthConfig, generate_world
from llm2clip.data.vocabulary import EN, POSITIONS, QA_TYPES, SHAPES, English
from llm2clip.errors import InputError
from llm2clip.eval.zeroshot import labelled_images

TINY = {"n_train": 30, "n_val": 5, "n_test": 5, "twin_prob": 0.5}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _bag(text: str) -> Counter:
    return Counter(re.findall(r"[\w-]+", text.lower()))


def _words(table: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """A regex alternation of every word of a table (longest first) and each word's meaning."""
    meaning = {word: key for key, words in table.items() for word in words}
    return "|".join(sorted(map(re.escape, meaning), key=len, reverse=True)), meaning


SIZE, SIZE_OF = _words(EN.sizes)
COLOR, COLOR_OF = _words(EN.colors)
SHAPE, SHAPE_OF = _words(EN.shapes)
REL, REL_OF = _words(EN.relations)
POS, POS_OF = _words(EN.positions)
BG, BG_OF = _words(EN.backgrounds)
NUMBER_OF = {word: i + 1 for i, word in enumerate(EN.numbers)} | {str(i): i for i in range(1, 10)}
MENTION = re.compile(rf"\b(?:({SIZE}) )?({COLOR}) ({SHAPE})\b")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass
class Facts:
    """What an English caption states, read from its words."""

    objects: list[tuple[str | None, str, str]] = field(default_factory=list)  # (size or None, colour, shape)
    relations: set[tuple[tuple[str, str], str, tuple[str, str]]] = field(default_factory=set)  # with inverses
    positions: list[tuple[tuple[str, str], str]] = field(default_factory=list)
    count: int | None = None
    background: str | None = None
    largest: tuple[str, str] | None = None


def read_facts(text: str) -> Facts:
    facts = Facts()
    for sentence in re.split(r"(?<=\.) ", text.lower()):
        mentions = list(MENTION.finditer(sentence))
        kinds = [(COLOR_OF[m[2]], SHAPE_OF[m[3]]) for m in mentions]
        facts.objects += [(SIZE_OF.get(m[1]), *kind) for m, kind in zip(mentions, kinds)]
        for (m, x), (n, y) in zip(zip(mentions, kinds), zip(mentions[1:], kinds[1:])):
            rel = re.search(rf"\b({REL})\b", sentence[m.end() : n.start()])
            if rel:
                facts.relations |= {(x, REL_OF[rel[1]], y), (y, INVERSE[REL_OF[rel[1]]], x)}
        position = re.search(rf"\b({POS})\b", sentence)
        if len(mentions) == 1 and position:
            facts.positions.append((kinds[0], POS_OF[position[1]]))
        if count := re.search(rf"\b({'|'.join(NUMBER_OF)}) shapes\b", sentence):
            facts.count = NUMBER_OF[count[1]]
        if background := re.search(rf"\b({BG}) (?:background|canvas)\b", sentence):
            facts.background = BG_OF[background[1]]
        if sentence.startswith("the largest shape is"):
            facts.largest = kinds[0]
    return facts


def false_statements(facts: Facts, record: dict) -> list[str]:
    """What the facts get wrong about the image, judged from the record's objects."""
    objects = {(o["color"], o["shape"]): o for o in record["objects"]}
    wrong = [f"no {c} {s}" for _, c, s in facts.objects if (c, s) not in objects]
    wrong += [f"the {c} {s} is not {size}" for size, c, s in facts.objects
              if (c, s) in objects and size not in (None, objects[(c, s)]["size"])]
    for x, rel, y in facts.relations:
        if x in objects and y in objects:
            (xr, xc), (yr, yc) = objects[x]["cell"], objects[y]["cell"]
            if not {"left": xc < yc, "right": xc > yc, "above": xr < yr, "below": xr > yr}[rel]:
                wrong.append(f"{x} is not {rel} {y}")
    wrong += [f"{kind} is not {pos}" for kind, pos in facts.positions if kind in objects and objects[kind]["position"] != pos]
    if facts.count not in (None, len(objects)):
        wrong.append(f"not {facts.count} shapes")
    if facts.background not in (None, record["background"]):
        wrong.append(f"the background is not {facts.background}")
    main = record["objects"][0]
    if facts.largest not in (None, (main["color"], main["shape"])):
        wrong.append(f"the largest shape is not the {facts.largest}")
    return wrong


def unsaid(short: Facts, long: Facts) -> list[str]:
    """What the short caption states that the long caption does not say."""
    sizes = {(c, s): size for size, c, s in long.objects if size}
    missing = [f"{c} {s}" for size, c, s in short.objects if (c, s) not in sizes or size not in (None, sizes[(c, s)])]
    missing += [f"{x} {rel} {y}" for x, rel, y in short.relations - long.relations]
    missing += [f"{name} {value}" for name, value in (("count", short.count), ("background", short.background))
                if value not in (None, getattr(long, name))]
    if short.largest and [kind for kind, size in sizes.items() if size == "large"] != [short.largest]:
        missing.append(f"the {short.largest} is the largest")
    return missing


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
            if " and " not in x:  # each caption is false of the other twin: only the binding tells
                assert false_statements(read_facts(x), b) and false_statements(read_facts(y), a)
        for x, y in zip(a["long_captions"], b["long_captions"], strict=True):
            assert x != y
        (a0, a1), (b0, b1) = a["objects"][:2], b["objects"][:2]
        if a["twin_kind"] == "color":
            assert (b0["color"], b1["color"]) == (a1["color"], a0["color"])
            assert (b0["shape"], b0["cell"]) == (a0["shape"], a0["cell"])
        else:
            assert (b0["color"], b0["shape"], b0["cell"]) == (a1["color"], a1["shape"], a0["cell"])
            assert (b1["color"], b1["shape"], b1["cell"]) == (a0["color"], a0["shape"], a1["cell"])
        assert [o["size"] for o in b["objects"]] == [o["size"] for o in a["objects"]]
        assert a["objects"][2:] == b["objects"][2:]


def _all_rows(world: Path) -> list[dict]:
    return [r for split in ("train", "val", "test") for r in _rows(world / f"{split}.jsonl")]


def test_short_captions_are_true_of_the_image_and_name_what_stands_out(world):
    for r in _all_rows(world):
        main = {(o["color"], o["shape"]) for o in r["objects"][:2]}
        for caption in r["captions"]:
            facts = read_facts(caption)
            assert false_statements(facts, r) == [], caption
            assert {tuple(kind) for _, *kind in facts.objects} == main, caption  # the two largest, nothing else
            assert len(facts.relations) == 2 or " and " in caption, caption
        for text in r["long_captions"]:
            facts = read_facts(text)
            assert false_statements(facts, r) == [], text
            assert len(facts.positions) == len(r["objects"]) and facts.count == len(r["objects"])


def test_each_long_caption_entails_every_short_caption(world):
    said = Counter()
    for r in _all_rows(world):
        for text in r["long_captions"]:
            for caption in r["captions"]:
                short = read_facts(caption)
                assert unsaid(short, read_facts(text)) == [], (caption, text)
                said.update(name for name in ("count", "background", "largest") if getattr(short, name))
                said.update(["size"] if any(size for size, *_ in short.objects) else [])
    assert set(said) == {"count", "background", "largest", "size"}  # the optional content does occur


def test_main_objects_are_the_largest_in_the_image(world):
    for r in _all_rows(world):
        assert [o["size"] for o in r["objects"]] == ["large", "medium"] + ["small"] * (len(r["objects"]) - 2)
        areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (o["bbox"] for o in r["objects"])]
        assert areas[0] > areas[1] > max(areas[2:])
        with Image.open(world / r["image"]) as image:
            bright = np.asarray(image).max(axis=2) > 110  # the shapes, not the dark background
        covered = [int(bright[y0:y1, x0:x1].sum()) for x0, y0, x1, y1 in (o["bbox"] for o in r["objects"])]
        assert covered[0] > max(covered[1:]), (r["id"], covered)  # whatever the shapes


def test_zeroshot_label_is_the_shape_of_the_main_object(world):
    rows = _rows(world / "test.jsonl")
    pairs = labelled_images(world, "test", list(SHAPES))
    assert [(image.name, SHAPES[label]) for image, label in pairs] == [
        (Path(r["image"]).name, r["objects"][0]["shape"]) for r in rows]
    for r in rows:  # the shape that the short captions name first or as the largest
        assert any(read_facts(c).largest == (r["objects"][0]["color"], r["objects"][0]["shape"])
                   or read_facts(c).objects[0][1:] == (r["objects"][0]["color"], r["objects"][0]["shape"])
                   for c in r["captions"])


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
            main = {(o["color"], o["shape"]) for o in r["objects"][:2]}  # described first, then their relation
            assert {tuple(kind) for _, *kind in read_facts(" ".join(sentences[1:4])).objects} == main
        for caption in r["captions"]:  # absolute positions only in the long caption
            assert "corner" not in caption


def test_french_captions(world):
    for r in _rows(world / "train.jsonl"):
        for en, fr in zip(r["captions"] + r["long_captions"][:1], r["captions_fr"] + [r["long_caption_fr"]]):
            assert en != fr
            assert re.search(r"\b(un|une|le|la|l'|il y a)\b", fr.lower())
        # Short French captions use the same template as the English ones at the same index.
        assert len(r["captions_fr"]) == len(r["captions"])


def test_questions_have_exact_answers(world):
    positions = {phrases[0]: name for name, phrases in English.positions.items()}
    for r in _rows(world / "train.jsonl"):
        objects, main = r["objects"], r["objects"][0]
        kinds = {(o["color"], o["shape"]): o for o in objects}
        assert [q["type"] for q in r["qa"]] == list(QA_TYPES)
        assert main["size"] == "large"
        for q in r["qa"]:
            words = q["question"].rstrip("?").split()
            if q["type"] == "color":
                assert q["answer"] == (r["background"] if words[-1] == "background" else main["color"])
            elif q["type"] == "shape":
                assert q["answer"] == main["shape"]
            elif q["type"] == "count":
                assert q["question"] == "How many shapes are there?" and q["answer"] == str(len(objects))
            elif q["type"] == "position":
                assert q["answer"] == main["position"]
            elif q["type"] == "size":
                place = positions[q["question"].removeprefix("What size is the shape ").rstrip("?")]
                assert [o["size"] for o in objects if o["position"] == place] == [q["answer"]]
            elif q["type"] == "yesno":
                assert q["answer"] == ("yes" if words[-1] in {o["shape"] for o in objects} else "no")
            elif q["question"].startswith("What color is the "):
                assert [o["color"] for o in objects if o["shape"] == words[-1]] == [q["answer"]]
            elif q["question"].startswith("Where is the "):
                assert kinds[(words[-2], words[-1])]["position"] == q["answer"]
            else:
                assert q["answer"] == ("yes" if (words[-2], words[-1]) in kinds else "no")


def test_answers_are_balanced_where_the_world_allows(world):
    """Size asks about the large, the medium and a small object equally often; yes/no is about half yes."""
    qa = [q for r in _rows(world / "train.jsonl") for q in r["qa"]]
    sizes = Counter(q["answer"] for q in qa if q["type"] == "size")
    yes = sum(q["answer"] == "yes" for q in qa if q["type"] == "yesno")
    n = len(qa) // len(QA_TYPES)
    assert max(sizes.values()) <= 0.6 * n and 0.2 * n <= yes <= 0.8 * n


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
            # One short-answer instruction per conversation, on its first question (format 5).
            asks = [t["value"].endswith(SHORT_ANSWER) for t in turns[::2] if not t["value"].endswith(DETAIL_PROMPT)]
            assert asks[0] and not any(asks[1:])

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


def test_worlds_of_an_older_format_are_refused(tmp_path):
    config = SynthConfig(out_dir=tmp_path, n_train=3, n_val=1, n_test=1)
    summary = generate_world(config)
    assert summary["format_version"] == FORMAT_VERSION == 6
    (tmp_path / "world.json").write_text(json.dumps({**summary, "format_version": 5}))
    with pytest.raises(InputError, match=r"format 5, now 6"):
        generate_world(config)
    generate_world(SynthConfig(out_dir=tmp_path, n_train=3, n_val=1, n_test=1, overwrite=True))
    assert json.loads((tmp_path / "world.json").read_text())["format_version"] == 6


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
