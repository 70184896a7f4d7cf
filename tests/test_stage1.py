"""Stage 1: MNTP masking and loss, caption-contrastive pairs and training, CRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from test_fileio import file_states
from transformers import AutoTokenizer, LlamaForCausalLM

from llm2clip.config import load_config
from llm2clip.data.records import ImageText, load_image_texts
from llm2clip.errors import InputError
from llm2clip.text.contrastive import (
    CaptionPairs,
    ContrastiveConfig,
    PairCollator,
    SameKindBatches,
    pair_counts,
    train_contrastive,
    training_pairs,
)
from llm2clip.text.cra import CRAConfig, bag_of_words_cra, caption_pairs, caption_retrieval_accuracy, report_cra
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.mntp import MaskedBlocks, MNTPConfig, corpus_blocks, mask_token_id, train_mntp
from llm2clip.training import TrainSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_train(**overrides) -> TrainSettings:
    settings = dict(max_steps=2, batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=2, warmup_ratio=0.0)
    settings.update(overrides)
    return TrainSettings(**settings)


# --- MNTP ---------------------------------------------------------------------------------------


def test_masked_blocks_mask_only_ordinary_tokens_and_keep_labels_there():
    bos, mask = 1, 7
    ids = [[bos] + list(range(10, 60)) for _ in range(8)]
    blocks = MaskedBlocks(datasets.Dataset.from_dict({"input_ids": ids}), mask_token_id=mask, mask_ratio=0.3,
                          special_token_ids=[0, bos, 2], seed=0)
    items = [blocks[0, i] for i in range(len(ids))]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    original = torch.tensor(ids)
    masked = batch["labels"] != -100
    assert not masked[:, 0].any(), "BOS must never be masked"
    assert torch.equal(batch["labels"][masked], original[masked])
    assert (batch["input_ids"][masked] == mask).all()
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert 0.2 < masked[:, 1:].float().mean() < 0.4
    assert (batch["attention_mask"] == 1).all()


def test_masks_derive_from_seed_epoch_and_index():
    ids = datasets.Dataset.from_dict({"input_ids": [list(range(10, 60))] * 2})
    blocks = MaskedBlocks(ids, mask_token_id=7, mask_ratio=0.3, special_token_ids=[1], seed=0)
    again = MaskedBlocks(ids, mask_token_id=7, mask_ratio=0.3, special_token_ids=[1], seed=0)
    torch.manual_seed(0)  # the global RNG plays no part
    first = blocks[1, 0]["labels"]
    torch.manual_seed(1)
    assert torch.equal(again[1, 0]["labels"], first)
    assert not torch.equal(blocks[1, 1]["labels"], first)  # another block, the same tokens
    assert not torch.equal(blocks[2, 0]["labels"], first)  # another epoch


def test_mntp_loss_predicts_each_masked_token_from_the_position_before(causal_lm_dir):
    model = LlamaForCausalLM.from_pretrained(causal_lm_dir).eval()
    model.config.is_causal = False
    ids = torch.tensor([[1, 20, 21, 22, 23, 24, 25]])
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[0, 5] = 22, 24
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    log_probs = out.logits[0].log_softmax(-1)
    expected = -(log_probs[2, 22] + log_probs[4, 24]) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_mntp_attention_is_bidirectional(causal_lm_dir):
    model = LlamaForCausalLM.from_pretrained(causal_lm_dir).eval()
    model.config.is_causal = False
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    changed = ids.clone()
    changed[0, -1] = 30
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, 0]
        second = model(input_ids=changed).logits[0, 0]
    assert (first - second).abs().max() > 1e-4


def test_mask_token_choices(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    assert mask_token_id(tokenizer, "eos") == tokenizer.eos_token_id
    blank = mask_token_id(tokenizer, "blank")
    assert tokenizer.decode([blank]) == "_"
    with pytest.raises(InputError, match="mask_token must be one of"):
        mask_token_id(tokenizer, "unknown")


def test_corpus_blocks_pack_to_full_blocks_and_refuse_a_tiny_corpus(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    blocks = corpus_blocks(tokenizer, ["a red circle above a blue square"] * 40, block_size=16)
    assert len(blocks) > 5 and all(len(row) == 16 for row in blocks["input_ids"])
    with pytest.raises(InputError, match="fewer than 512 tokens"):
        corpus_blocks(tokenizer, ["a red circle"], block_size=512)


def test_train_mntp_writes_llm2vec_layout_and_resumes(tmp_path, causal_lm_dir, small_world):
    out = tmp_path / "mntp"
    config = MNTPConfig(model=causal_lm_dir, corpus=small_world / "corpus.txt", out_dir=out, max_seq_length=32,
                        train=tiny_train())
    train_mntp(config)
    for name in ("adapter/adapter_config.json", "adapter/llm2vec_config.json", "merged/config.json",
                 "merged/model.safetensors", "merged/llm2vec_config.json", "mntp_report.json"):
        assert (out / name).is_file(), name
    assert "is_causal" not in json.loads((out / "merged" / "config.json").read_text())
    assert json.loads((out / "merged" / "llm2vec_config.json").read_text())["max_length"] == 512
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(causal_lm_dir.resolve())

    # base + adapter (llm2vec's way of loading an MNTP model) equals the merged encoder
    texts = ["a crimson circle left of a blue box", "a small green star"]
    merged = LLMEncoder.from_pretrained(out / "merged").encode(texts, show_progress=False)
    stacked = LLMEncoder.from_pretrained(causal_lm_dir, adapters=[out / "adapter"]).encode(texts, show_progress=False)
    base = LLMEncoder.from_pretrained(causal_lm_dir).encode(texts, show_progress=False)
    assert torch.allclose(merged, stacked, atol=1e-5)
    assert (merged - base).abs().max() > 1e-6, "the adapter changed nothing"

    before = file_states(out)
    assert train_mntp(config)["steps"] == 2  # finished: a rerun changes nothing
    assert file_states(out) == before

    first = json.loads((out / "mntp_report.json").read_text())
    config.train = tiny_train(max_steps=4)
    train_mntp(config)
    report = json.loads((out / "mntp_report.json").read_text())
    assert report["steps"] == 4
    assert report["train_runtime_s"] > first["train_runtime_s"]  # over both runs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_train_mntp_refuses_bad_input(tmp_path, causal_lm_dir, small_world):
    with pytest.raises(InputError, match="no-such-model"):
        train_mntp(MNTPConfig(model=tmp_path / "no-such-model", corpus=small_world / "corpus.txt"))
    with pytest.raises(InputError, match="mask_ratio"):
        train_mntp(MNTPConfig(model=causal_lm_dir, corpus=small_world / "corpus.txt", mask_ratio=1.5))
    with pytest.raises(InputError, match="missing.txt"):
        train_mntp(MNTPConfig(model=causal_lm_dir, corpus=tmp_path / "missing.txt"))


# --- caption contrastive ------------------------------------------------------------------------


def image(shorts: list[str], longs: list[str] = ()) -> ImageText:
    return ImageText(image=Path("x.png"), captions=list(shorts), long_captions=list(longs))


def test_caption_pairs_draw_from_seed_epoch_and_index_then_plain_sentences():
    records = [image(["a", "b", "c"], ["long a"]), image(["only one"]), image(["d", "e"], ["long d", "long e"])]
    counts = {"short_long": 2, "short_short": 2, "long_long": 1}
    pairs = CaptionPairs(records, counts, ["plain text"], seed=0)
    assert pairs.kinds == ["short_long"] * 2 + ["short_short"] * 2 + ["long_long", "plain"]
    for index in range(5):
        first, second = pairs[0, index]
        assert first != second
    assert pairs[0, 4] in {("long d", "long e"), ("long e", "long d")}
    assert pairs[0, 5] == ("plain text", "plain text")
    draws = [pairs[epoch, 2] for epoch in range(20)]
    assert len(set(draws)) > 1  # a fresh draw each epoch ...
    again = CaptionPairs(records, counts, ["plain text"], seed=0)
    assert [again[epoch, 2] for epoch in reversed(range(20))] == draws[::-1]  # ... from (seed, epoch, index) alone


def test_short_long_pairs_put_the_short_caption_first_and_walk_every_image():
    records = [image([f"short {i}", f"other short {i}"], [f"long {i}"]) for i in range(5)]
    pairs = CaptionPairs(records, {"short_long": 2}, [], seed=0)
    seen = set()
    for epoch in range(5):  # 2 pairs an epoch over 5 images: each epoch goes on where the last one stopped
        for index in range(2):
            short, long = pairs[epoch, index]
            number = long.removeprefix("long ")
            assert short in {f"short {number}", f"other short {number}"}
            seen.add(number)
    assert seen == {str(i) for i in range(5)}


def test_pair_counts_share_the_mix_among_the_kinds_the_data_can_form():
    world_like = [image(["a", "b"], ["long a", "long b"])] * 20
    assert pair_counts(world_like, {"short_long": 0.5, "short_short": 0.25, "long_long": 0.25}) == {
        "short_long": 10, "short_short": 5, "long_long": 5}
    sharegpt4v_like = [image(["a"], ["a. And more."])] * 8  # one short, one long: only short_long
    assert pair_counts(sharegpt4v_like, {"short_long": 1, "short_short": 0.25, "long_long": 0.25}) == {"short_long": 8}
    coco_like = [image(["a", "b", "c"])] * 6
    assert pair_counts(coco_like, {"short_long": 1, "short_short": 0.25, "long_long": 0.25}) == {"short_short": 6}
    one_sentence = [image(["a cat"], ["a cat"])] * 3  # a LLaVA caption read as short and long is no pair
    with pytest.raises(InputError, match="no image has two captions of a kind the pair mix asks for"):
        pair_counts(one_sentence, {"short_long": 1})
    with pytest.raises(InputError, match="unknown pair kind 'short_medium'"):
        pair_counts(world_like, {"short_medium": 1})
    with pytest.raises(InputError, match="weights must be >= 0"):
        pair_counts(world_like, {"short_long": -1, "short_short": 2})
    with pytest.raises(InputError, match="weights must be >= 0"):
        pair_counts(world_like, {"short_long": 0})


def test_world_gives_every_kind_of_pair(small_world):
    config = ContrastiveConfig(data=small_world, corpus=small_world / "corpus.txt")
    pairs = training_pairs(config)
    records = load_image_texts(small_world, "train")
    shorts = {c for r in records for c in r.captions}
    longs = {c for r in records for c in r.long_captions}
    assert pairs.counts == {"short_long": 10, "short_short": 5, "long_long": 5}
    assert pairs.kinds.count("plain") == len(pairs.sentences) == 2
    sides = {"short_long": (shorts, longs), "short_short": (shorts, shorts), "long_long": (longs, longs)}
    for index, kind in enumerate(pairs.kinds):
        first, second = pairs[0, index]
        if kind != "plain":
            assert first != second and first in sides[kind][0] and second in sides[kind][1]
    only_short = training_pairs(ContrastiveConfig(data=small_world, corpus=None, pairs={"short_short": 1}))
    assert set(only_short.kinds) == {"short_short"} and len(only_short) == len(records)


COLOURS = ["red", "green", "yellow", "pink", "white", "black", "brown", "orange"]


def sharegpt4v_file(path: Path, images: int) -> Path:
    """A ShareCaptioner-style file: one dense caption per image, whose first sentence is the short one."""
    entries = [{"id": f"sa_{i}", "image": f"sam/images/sa_{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
        {"from": "gpt", "value": f"A {colour} circle sits left of a blue square. The background is dark grey, "
                                 f"and the {colour} circle is twice the size of the square."}]}
               for i, colour in enumerate(COLOURS[:images])]
    path.write_text(json.dumps(entries))
    return path


def test_sharegpt4v_file_pairs_each_short_caption_with_its_dense_caption(tmp_path):
    data = sharegpt4v_file(tmp_path / "share-captioner.json", images=6)
    config = load_config(ContrastiveConfig, CONFIGS / "llama3-8b-stage1-contrastive.yaml",
                         [f"data={data}", "corpus=null"])
    pairs = training_pairs(config)
    assert pairs.counts == {"short_long": 6}
    for index in range(len(pairs)):
        short, dense = pairs[0, index]
        assert dense.startswith(short) and short.endswith("square.") and len(dense) > len(short)


def test_real_scale_config_trains_on_a_sharegpt4v_fixture(tmp_path, encoder_dir, small_world, one_thread):
    data = sharegpt4v_file(tmp_path / "share-captioner.json", images=8)
    overrides = [f"model={encoder_dir}", f"data={data}", f"corpus={small_world / 'corpus.txt'}",
                 f"out_dir={tmp_path / 'contrastive'}", "plain_text_max_words=20", "max_length=48",
                 "train.max_steps=2", "train.batch_size=2", "train.precision=fp32", "train.deepspeed=null",
                 "train.dataloader_workers=0", "train.save_steps=2", "train.logging_steps=1"]
    report = train_contrastive(load_config(ContrastiveConfig, CONFIGS / "llama3-8b-stage1-contrastive.yaml", overrides))
    assert report["steps"] == 2 and report["caption_pairs"] == {"short_long": 8}
    assert (tmp_path / "contrastive" / "merged" / "model.safetensors").is_file()


def test_pair_collator_pads_anchors_and_positives_apart(encoder_dir):
    encoder = LLMEncoder.from_pretrained(encoder_dir)
    short, long = "a red star", " ".join(["a small crimson box right of a big blue circle."] * 4)
    batch = PairCollator(encoder)([(short, long), ("a blue box", long)])
    assert batch["input_ids"].shape[1] < batch["positive_input_ids"].shape[1] / 3  # shorts not padded to the long side
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["positive_attention_mask"].shape == batch["positive_input_ids"].shape


def test_same_kind_batches_keep_each_block_to_one_kind():
    kinds = ["short_short"] * 10 + ["short_long"] * 7 + ["short_short"] * 3
    sampler = SameKindBatches(kinds, block=4, seed=0)
    keys = list(sampler)
    assert {epoch for epoch, _ in keys} == {0}
    order = [index for _, index in keys]
    assert len(order) == len(sampler) == 16  # 13 short_short -> 3 blocks, 7 short_long -> 1 block
    assert len(set(order)) == 16
    blocks = [order[i : i + 4] for i in range(0, 16, 4)]
    assert all(len({kinds[i] for i in block}) == 1 for block in blocks)
    assert sorted(kinds[block[0]] for block in blocks) == ["short_long"] + ["short_short"] * 3
    assert list(SameKindBatches(kinds, block=4, seed=0)) == keys  # the same epoch, the same order
    sampler.set_epoch(1)
    assert {epoch for epoch, _ in sampler} == {1} and [index for _, index in sampler] != order
    with pytest.warns(UserWarning, match="short_long"):
        assert len(SameKindBatches(kinds, block=8, seed=0)) == 8  # 13 short_short -> 1 block; 7 short_long fill none
    with pytest.raises(InputError, match="every kind of pair has fewer pairs than one global batch of 16"):
        SameKindBatches(kinds, block=16, seed=0)


def test_train_contrastive_outputs_load_and_agree(tmp_path, encoder_dir, small_world):
    out = tmp_path / "contrastive"
    config = ContrastiveConfig(model=encoder_dir, data=small_world, corpus=small_world / "corpus.txt",
                               out_dir=out, max_length=48, train=tiny_train())
    train_contrastive(config)
    before = file_states(out)
    assert train_contrastive(config)["steps"] == 2  # finished: a rerun changes nothing
    assert file_states(out) == before
    report = json.loads((out / "contrastive_report.json").read_text())
    assert report["caption_pairs"] == {"short_long": 10, "short_short": 5, "long_long": 5}
    assert report["steps"] == 2 and report["plain_text_pairs"] > 0
    assert json.loads((out / "merged" / "llm2vec_config.json").read_text())["max_length"] == 512
    texts = ["a crimson circle left of a blue box", "two shapes"]
    merged = LLMEncoder.from_pretrained(out / "merged").encode(texts, show_progress=False)
    stacked = LLMEncoder.from_pretrained(encoder_dir, adapters=[out / "adapter"]).encode(texts, show_progress=False)
    assert torch.allclose(merged, stacked, atol=1e-5)


@pytest.mark.parametrize("stage", ["mntp", "contrastive"])
def test_the_same_seed_gives_the_same_weights(tmp_path, causal_lm_dir, encoder_dir, small_world, stage):
    def run(out: Path, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # where a fresh process's global RNG starts is anyone's guess
        if stage == "mntp":
            train_mntp(MNTPConfig(model=causal_lm_dir, corpus=small_world / "corpus.txt", out_dir=out,
                                  max_seq_length=32, train=tiny_train()))
        else:
            train_contrastive(ContrastiveConfig(model=encoder_dir, data=small_world, corpus=small_world / "corpus.txt",
                                                out_dir=out, max_length=48, train=tiny_train()))
        return load_file(out / "merged" / "model.safetensors")

    first, second = run(tmp_path / "first", 1), run(tmp_path / "second", 2)
    assert first.keys() == second.keys()
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


def test_full_tuning_trains_every_weight_and_writes_only_the_merged_encoder(tmp_path, encoder_dir, small_world):
    out = tmp_path / "full"
    config = ContrastiveConfig(model=encoder_dir, data=small_world, corpus=small_world / "corpus.txt", tune="full",
                               out_dir=out, max_length=48, train=tiny_train())
    train_contrastive(config)
    assert not (out / "adapter").exists()
    before, after = load_file(encoder_dir / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert before.keys() == after.keys()
    assert [name for name in before if torch.equal(before[name], after[name])] == []
    assert train_contrastive(config)["steps"] == 2  # finished: a rerun is a no-op
    with pytest.raises(InputError, match="tune must be one of lora, full"):
        train_contrastive(ContrastiveConfig(model=encoder_dir, data=small_world, tune="qlora", out_dir=tmp_path / "x"))


def test_train_contrastive_refuses_data_without_pairs(tmp_path, encoder_dir):
    data = tmp_path / "single.jsonl"
    data.write_text(json.dumps({"image": "x.png", "captions": ["only one caption"]}) + "\n")
    with pytest.raises(InputError, match="two captions"):
        train_contrastive(ContrastiveConfig(model=encoder_dir, data=data, corpus=None, out_dir=tmp_path / "out"))


# --- CRA ----------------------------------------------------------------------------------------


def test_cra_counts_partners_and_shares_ties():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert caption_retrieval_accuracy(a, a.clone()) == pytest.approx(1.0)
    assert caption_retrieval_accuracy(a, a.flip(0)) == pytest.approx(1 / 3)  # only the middle row keeps its partner
    same = torch.ones(4, 3)
    assert caption_retrieval_accuracy(same, same) == pytest.approx(0.25)  # all tied: chance
    with pytest.raises(ValueError, match="same shape"):
        caption_retrieval_accuracy(a, a[:2])


def test_bag_of_words_cannot_tell_bound_attributes_apart():
    a = ["a red circle and a blue square", "a blue circle and a red square"]
    b = ["a blue square and a red circle", "a red square and a blue circle"]
    assert bag_of_words_cra(a, b) == pytest.approx(0.5)


def test_report_cra_for_a_model_and_the_bag_of_words(tmp_path, encoder_dir, small_world, capsys):
    out = tmp_path / "cra.json"
    report = report_cra(CRAConfig(model=[str(encoder_dir)], data=small_world, split="train", out=out))
    assert set(report["cra"]) == {"bag of words", str(encoder_dir)}
    assert report["images"] == 20
    assert json.loads(out.read_text()) == report
    assert "CRA (short captions) on 20 train images" in capsys.readouterr().out
    with pytest.raises(InputError, match="has 9 short captions"):
        report_cra(CRAConfig(model=None, data=small_world, split="train", caption_b=8))


def test_report_cra_on_long_captions(small_world, capsys):
    a_texts, b_texts = caption_pairs(CRAConfig(data=small_world, split="train", kind="long"))
    records = load_image_texts(small_world, "train")
    assert (a_texts, b_texts) == ([r.long_captions[0] for r in records], [r.long_captions[1] for r in records])
    report = report_cra(CRAConfig(model=None, data=small_world, split="train", kind="long"))
    assert report["kind"] == "long" and 0 < report["cra"]["bag of words"] <= 1
    assert "CRA (long captions) on 20 train images" in capsys.readouterr().out
    with pytest.raises(InputError, match="has 3 long captions"):
        report_cra(CRAConfig(data=small_world, split="train", kind="long", caption_b=2))
    with pytest.raises(InputError, match="kind must be one of short, long, translated, translated_long"):
        report_cra(CRAConfig(data=small_world, kind="medium"))


def test_stage1_outputs_are_plain_directories(tmp_path, encoder_dir):
    """A merged encoder directory is self-contained: it loads after the source is gone."""
    copy = tmp_path / "copy"
    shutil.copytree(encoder_dir, copy)
    LLMEncoder.from_pretrained(copy).save_pretrained(tmp_path / "saved")
    shutil.rmtree(copy)
    assert LLMEncoder.from_pretrained(tmp_path / "saved").encode(["a red star"], show_progress=False).shape[0] == 1
