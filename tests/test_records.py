"""Loaders for local image-text files: the world, JSONL, COCO-Karpathy and ShareGPT4V/LLaVA JSON."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llm2clip.data.records import check_image, load_image_texts, read_corpus
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.errors import InputError
from llm2clip.data.vocabulary import QA_TYPES

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(SynthConfig(out_dir=out, n_train=12, n_val=4, n_test=4))
    return out


def test_world_directory(world):
    train = load_image_texts(world)
    assert [r.id for r in train] == [f"train-{i:05d}" for i in range(12)]
    first = train[0]
    assert first.image == world.resolve() / "images" / "train" / "train-00000.png"
    assert first.image.is_file()
    assert len(first.captions) == 4 and len(first.long_captions) == 2
    assert len(first.translated) == 5  # four short French captions and the first long one
    assert [q["type"] for q in first.qa] == list(QA_TYPES)
    assert len(load_image_texts(world, split="test")) == 4
    assert len(load_image_texts(world, split=None)) == 20


def test_world_unknown_split(world):
    with pytest.raises(InputError, match="no split 'dev'"):
        load_image_texts(world, split="dev")


def test_world_jsonl_file_directly(world):
    records = load_image_texts(world / "val.jsonl", split=None)
    assert [r.id for r in records] == [f"val-{i:05d}" for i in range(4)]
    assert records[0].image == world.resolve() / "images" / "val" / "val-00000.png"


def test_world_karpathy_json(world):
    test = load_image_texts(world / "karpathy.json", split="test")
    assert len(test) == 4
    assert test[0].image == world.resolve() / "images" / "test" / "test-00000.png"
    rows = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    assert test[0].captions == rows[0]["captions"]


def test_world_llava_pretrain_json(world):
    # LLaVA files name images relative to an image folder: here the world directory.
    records = load_image_texts(world / "llava" / "pretrain.json", image_root=world)
    assert len(records) == 12
    assert all(r.image.is_file() for r in records)


def test_jsonl_fixture():
    records = load_image_texts(FIXTURES / "captions.jsonl", split=None)
    a, b, c = records
    assert a.captions == ["A cat on a sofa.", "a sleeping cat"]
    assert a.long_captions[0].startswith("A grey cat")
    assert b.captions == ["A boat on a lake."]  # a string counts as one caption
    assert len(b.long_captions) == 2
    assert c.translated == ["Trois pommes dans un bol."]
    assert c.qa[0]["answer"] == "3"
    assert a.image == (FIXTURES / "images" / "a.png").resolve()


def test_jsonl_split_filter_and_image_root(tmp_path):
    records = load_image_texts(FIXTURES / "captions.jsonl", split="val", image_root=tmp_path)
    # Lines with a "split" key are filtered; lines without one belong to every split.
    assert [r.id for r in records] == ["b", "c"]
    assert records[0].image == tmp_path / "images" / "b.png"


def test_jsonl_absolute_image_path(tmp_path):
    image = tmp_path / "elsewhere" / "x.png"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": str(image), "captions": ["x"]}) + "\n")
    assert load_image_texts(data)[0].image == image


def test_karpathy_coco_fixture():
    skipped = Counter()
    train = load_image_texts(FIXTURES / "karpathy_coco.json", skipped=skipped)
    # "restval" counts as train; the image with no sentences is skipped and counted.
    assert skipped == {"with no captions": 1}
    assert [r.id for r in train] == ["101", "202"]
    assert train[0].captions == ["A dog runs across a grassy field.", "a brown dog playing outside"]
    assert train[1].image == (FIXTURES / "val2014" / "COCO_val2014_000000000202.jpg").resolve()
    test = load_image_texts(FIXTURES / "karpathy_coco.json", split="test")
    assert [len(r.captions) for r in test] == [2]
    assert len(load_image_texts(FIXTURES / "karpathy_coco.json", split=None)) == 4


def test_karpathy_flickr_fixture_without_filepath(tmp_path):
    records = load_image_texts(FIXTURES / "karpathy_flickr.json", image_root=tmp_path / "flickr30k-images")
    assert len(records) == 1
    assert records[0].image == tmp_path / "flickr30k-images" / "1000001.jpg"


def test_sharegpt4v_fixture():
    skipped = Counter()
    records = load_image_texts(FIXTURES / "sharegpt4v.json", skipped=skipped)
    assert skipped == {"without an image": 1, "with no captions": 1}
    first, second = records
    assert first.captions == ["The image shows a wooden table by a window."]
    assert first.long_captions[0].endswith("from the left.")
    assert first.image == (FIXTURES / "coco" / "train2017" / "000000000111.jpg").resolve()
    assert second.captions == ["A narrow street lined with colorful houses leads toward a hill!"]


def test_llava_pretrain_fixture():
    records = load_image_texts(FIXTURES / "llava_pretrain.json")
    assert [r.captions for r in records] == [["a lighthouse on a rocky coast at sunset"],
                                            ["handmade ceramic bowls stacked on a shelf"]]


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="dataset not found"):
        load_image_texts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("data.csv", "image,caption\n", "unknown dataset format"),
    ("data.json", '{"annotations": []}', r"unknown JSON format \(keys \['annotations'\]\)"),
    ("data.json", '"just a string"', "unknown JSON format"),
    ("data.json", '{"images": [\n{"filename": "a.jpg"},\n', "malformed JSON at line 3"),
    ("data.json", '{"images": [{"split": "train"}]}', r"images\[0\] needs a 'filename'"),
    ("data.json", '{"images": [{"filename": "a.jpg", "sentences": ["a cat"]}]}', "'sentences' must be"),
    ("data.json", '[{"image": "a.jpg", "conversations": []}, {"image": "b.jpg"}]', "entry 1 has no 'conversations'"),
    ("data.jsonl", '{"image": "a.png", "captions": ["ok"]}\n{"image": "b.png", "captions": [\n', r"data.jsonl:2: malformed JSON"),
    ("data.jsonl", '["a.png", "a caption"]\n', r"data.jsonl:1: expected a JSON object"),
    ("data.jsonl", '{"captions": ["no image"]}\n', r"data.jsonl:1: needs an 'image'"),
    ("data.jsonl", '{"image": "a.png", "captions": [1, 2]}\n', "'captions' must be a string or a list of strings"),
    ("data.jsonl", '{"image": "a.png", "captions": "x", "qa": "what?"}\n', "'qa' must be a list"),
])
def test_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_image_texts(path)


def test_directory_without_world(tmp_path):
    with pytest.raises(InputError, match="without world.json"):
        load_image_texts(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"image": "a.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        load_image_texts(path)


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_entries_without_captions_are_counted_by_reason(tmp_path):
    lines = [{"image": "a.png", "captions": ["a cat"]}, {"image": "b.png", "captions": []},
             {"image": "c.png", "captions": "  "}, {"image": "d.png", "captions": [], "long_caption": "a long one"}]
    skipped = Counter()
    records = load_image_texts(write_jsonl(tmp_path / "data.jsonl", lines), skipped=skipped)
    assert [r.captions for r in records] == [["a cat"]]
    assert skipped == {"with no captions": 2, "with long captions but no short ones": 1}


def test_a_file_whose_lines_lack_the_caption_key_names_the_key_and_the_first_line(tmp_path):
    lines = [{"image": f"{i}.png", **({"captions": ["a cat"]} if i % 2 else {"caption": "a cat"})} for i in range(20)]
    with pytest.raises(InputError, match=r"data.jsonl: 10 of 20 entries lack their caption key \(more than 10%\); "
                                         r"the first: line 1 has key 'caption', expected 'captions'"):
        load_image_texts(write_jsonl(tmp_path / "data.jsonl", lines))


def test_a_few_lines_without_the_caption_key_are_counted(tmp_path):
    lines = [{"image": f"{i}.png", "captions": ["a cat"]} for i in range(19)] + [{"image": "x.png", "text": "a cat"}]
    skipped = Counter()
    assert len(load_image_texts(write_jsonl(tmp_path / "data.jsonl", lines), skipped=skipped)) == 19
    assert skipped == {"with no 'captions' key": 1}


def test_empty_after_filtering(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.png", "captions": ["x"], "split": "train"}) + "\n")
    with pytest.raises(InputError, match="no usable entries in split 'test'"):
        load_image_texts(path, split="test")
    only_empty = tmp_path / "empty.jsonl"
    only_empty.write_text(json.dumps({"image": "a.png", "captions": []}) + "\n")
    with pytest.raises(InputError, match=r"no usable entries in split .train. \(1 with no captions\)"):
        load_image_texts(only_empty)


def test_check_image(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good)
    assert check_image(good) is None
    assert check_image(tmp_path / "gone.png").startswith("missing image")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    assert check_image(garbage).startswith("corrupt image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    assert check_image(truncated).startswith("corrupt image")


def test_read_corpus(tmp_path, world):
    path = tmp_path / "corpus.txt"
    path.write_text("  first line \n\n\nsecond line\n   \n")
    assert read_corpus(path) == ["first line", "second line"]
    assert read_corpus(world) == read_corpus(world / "corpus.txt")  # a world directory means its corpus
    with pytest.raises(InputError, match="corpus not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="is empty"):
        read_corpus(tmp_path / "blank.txt")
