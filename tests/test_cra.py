"""Cross-lingual CRA: an English caption against its own French rendering, with the bag of words beside it."""

from __future__ import annotations

import json

import pytest

from llm2clip import cli
from llm2clip.data.records import load_image_texts
from llm2clip.errors import InputError
from llm2clip.text.cra import CRAConfig, caption_pairs, report_cra

pytestmark = pytest.mark.usefixtures("one_thread")


def test_translated_pairs_are_each_english_caption_and_its_own_rendering(small_world):
    records = load_image_texts(small_world, "train")
    rows = [json.loads(line) for line in (small_world / "train.jsonl").read_text().splitlines()]
    assert [r.captions_fr for r in records] == [row["captions_fr"] for row in rows]
    assert [r.long_captions_fr for r in records] == [[row["long_caption_fr"]] for row in rows]

    english, french = caption_pairs(CRAConfig(data=small_world, split="train", kind="translated", caption_a=2))
    assert (english, french) == ([row["captions"][2] for row in rows], [row["captions_fr"][2] for row in rows])
    english, french = caption_pairs(CRAConfig(data=small_world, split="train", kind="translated_long"))
    assert (english, french) == ([row["long_captions"][0] for row in rows], [row["long_caption_fr"] for row in rows])


def test_bag_of_words_is_at_chance_when_the_languages_share_no_word(tmp_path):
    data = tmp_path / "captions.jsonl"
    colours = [("red", "rouge"), ("green", "vert"), ("grey", "gris"), ("black", "noir")]
    lines = [{"image": f"{i}.png", "captions": [f"a {colour} cat"], "captions_fr": [f"un chat {couleur}"]}
             for i, (colour, couleur) in enumerate(colours)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = report_cra(CRAConfig(data=data, split=None, kind="translated"))
    assert report["images"] == 4 and report["cra"]["bag of words"] == pytest.approx(report["chance"]) == 0.25


def test_translated_cra_of_an_encoder_through_the_cli(tmp_path, encoder_dir, small_world, capsys):
    out = tmp_path / "cra.json"
    assert cli.main(["cra", "--model", str(encoder_dir), "--data", str(small_world), "--split", "train",
                     "kind=translated_long", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "translated_long" and report["images"] == 20
    assert set(report["cra"]) == {"bag of words", str(encoder_dir)}
    assert all(0 < value <= 1 for value in report["cra"].values())
    assert "CRA (translated long captions) on 20 train images" in capsys.readouterr().out


def test_translated_cra_needs_french_captions(small_world, capsys):
    with pytest.raises(InputError, match=r"has caption 0 with its French rendering \(captions_fr\)"):
        caption_pairs(CRAConfig(data=small_world / "karpathy.json", split="train", kind="translated"))
    with pytest.raises(InputError, match=r"caption 1 with its French rendering \(long_caption_fr\)"):
        caption_pairs(CRAConfig(data=small_world, split="train", kind="translated_long", caption_a=1))
    assert cli.main(["cra", "--data", str(small_world / "karpathy.json"), "kind=translated"]) != 0
    assert "French rendering" in capsys.readouterr().err


def test_several_kinds_in_one_run_match_one_run_each(tmp_path, small_world, encoder_dir):
    kinds = ("short", "long", "translated")
    model = [str(encoder_dir)]
    together = report_cra(CRAConfig(model=model, data=small_world, split="train", kind=",".join(kinds),
                                    out=tmp_path / "cra-{kind}.json"))
    for kind in kinds:
        alone = report_cra(CRAConfig(model=model, data=small_world, split="train", kind=kind))
        assert set(alone["cra"]) == {"bag of words", str(encoder_dir)}
        assert together[kind] == alone == json.loads((tmp_path / f"cra-{kind}.json").read_text())
    with pytest.raises(InputError, match=r"need an out path with \{kind\}"):
        report_cra(CRAConfig(data=small_world, split="train", kind="short,long", out=tmp_path / "cra.json"))
