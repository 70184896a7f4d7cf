"""Stage-2 evaluation: metrics by hand, zero-shot on a fake tower, and `llm2clip eval` on tiny saved models."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from llm2clip import cli
from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.config import load_config
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.data.vocabulary import SHAPES
from llm2clip.embed import weight_hash
from llm2clip.errors import InputError
from llm2clip.eval.metrics import hit_rate, retrieval_recall, zeroshot_accuracy
from llm2clip.eval.report import markdown
from llm2clip.eval.run import TASKS, EvalConfig, display_names, evaluate
from llm2clip.eval.towers import CLIPTower, ImageTextTower, LLM2CLIPTower, load_tower
from llm2clip.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    labelled_images,
    read_classnames,
    read_templates,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "classnames"
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8}


# ---------------------------------------------------------------- metrics, by hand


def test_retrieval_recall_by_hand():
    # 2 images, 3 texts: texts 0 and 1 describe image 0, text 2 describes image 1.
    scores = torch.tensor([[0.9, 0.1, 0.5],
                           [0.9, 0.3, 0.8]])
    metrics = retrieval_recall(scores, torch.tensor([0, 0, 1]), ks=(1, 2, 5))
    # Image 0: best text is its own. Image 1: text 0 (not its own) beats text 2.
    assert metrics["i2t R@1"] == pytest.approx(0.5)
    assert metrics["i2t R@2"] == pytest.approx(1.0)
    # Text 0: images tie (chance 1/2); text 1 ranks image 1 first (miss); text 2 finds image 1.
    assert metrics["t2i R@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["t2i R@2"] == pytest.approx(1.0)
    assert metrics["i2t R@5"] == metrics["t2i R@5"] == 1.0  # k beyond the number of candidates


def test_image_query_hits_when_any_of_its_texts_is_in_the_top_k():
    scores = torch.tensor([[0.7, 0.9, 0.6, 0.5]])  # texts 0 and 2 are the image's, ranked 2nd and 3rd
    positive = torch.tensor([[True, False, True, False]])
    assert hit_rate(scores, positive, 1).item() == 0.0
    assert hit_rate(scores, positive, 2).item() == 1.0


@pytest.mark.parametrize("row, positive, k, expected", [
    ([1, 1, 1, 1], [1, 1, 0, 0], 1, 2 / 4),  # 2 of 4 tied candidates are positives
    ([1, 1, 1, 1], [1, 1, 0, 0], 2, 1 - (2 / 4) * (1 / 3)),  # both slots go to negatives with chance 1/6
    ([2, 1, 1, 1], [0, 1, 0, 0], 2, 1 / 3),  # one slot left for three tied candidates
    ([2, 3, 1, 1], [0, 0, 1, 0], 2, 0.0),  # no slot left
    ([1, 1, 1, 1], [0, 0, 0, 1], 9, 1.0),
])
def test_hit_rate_shares_ties(row, positive, k, expected):
    value = hit_rate(torch.tensor([row], dtype=torch.float32), torch.tensor([positive]).bool(), k)
    assert value.item() == pytest.approx(expected)


def test_constant_features_score_chance_not_a_lucky_win():
    n = 8
    metrics = retrieval_recall(torch.ones(n, n), torch.arange(n), ks=(1, 5))
    assert metrics["i2t R@1"] == metrics["t2i R@1"] == pytest.approx(1 / n)
    assert metrics["t2i R@5"] == pytest.approx(5 / n)


def test_zeroshot_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0],
                           [0.8, 0.1, 0.1]])
    metrics = zeroshot_accuracy(logits, torch.tensor([1, 1]), ks=(1, 2, 5))
    assert metrics["top-1"] == pytest.approx(0.5)
    assert metrics["top-2"] == pytest.approx((1 + 0.5) / 2)  # image 1: class 1 ties class 2 for the 2nd slot
    assert metrics["top-5"] == 1.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_recall(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one positive"):
        retrieval_recall(torch.zeros(3, 3), torch.tensor([0, 0, 1]))  # image 2 has no text
    with pytest.raises(ValueError, match="labels outside"):
        zeroshot_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))


# ---------------------------------------------------------------- zero-shot on a fake tower

COLORS = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255)}


class ColorTower(ImageTextTower):
    """Images: one-hot of the strongest RGB channel. Texts: one-hot of the class named, plus a template part."""

    kind = "fake"

    def __init__(self):
        self.seen: list[str] = []

    def image_features(self, images):
        channels = [max(range(3), key=lambda c: image.getpixel((0, 0))[c]) for image in images]
        return F.pad(F.one_hot(torch.tensor(channels), 3).float(), (0, 3))

    def text_features(self, texts):
        self.seen += texts
        rows = []
        for text in texts:
            row = torch.zeros(6)
            row[[name in text for name in COLORS].index(True)] = 1.0
            row[3 + ("photo" in text)] = 0.5  # templates differ in a direction of their own
            rows.append(row)
        return F.normalize(torch.stack(rows), dim=-1)


def test_class_embedding_is_the_normalised_mean_of_normalised_templates():
    tower = ColorTower()
    weights = class_embeddings(tower, ["circle", "square"], ["a photo of a {}.", "a {}."])
    assert tower.seen == ["a photo of a circle.", "a circle.", "a photo of a square.", "a square."]
    expected = F.normalize(torch.tensor([2.0, 0, 0, 0.5, 0.5, 0]), dim=0)
    assert torch.allclose(weights[0], expected)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2))


def test_zeroshot_on_a_fake_tower_gets_the_known_answer(tmp_path):
    names = ["circle", "square", "triangle"]
    lines = []
    for i, (color, label) in enumerate([("circle", "circle"), ("square", 1), ("triangle", "triangle"),
                                        ("circle", "square")]):  # the last one is labelled wrongly
        Image.new("RGB", (4, 4), COLORS[color]).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "label": label}))
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    pairs = labelled_images(tmp_path / "labels.jsonl", "test", names)
    assert [label for _, label in pairs] == [0, 1, 2, 1]
    tower = ColorTower()
    weights = class_embeddings(tower, names, read_templates(None))
    images = [Image.open(path) for path, _ in pairs]
    logits = tower.image_features(images) @ weights.T
    metrics = zeroshot_accuracy(logits, torch.tensor([label for _, label in pairs]), ks=(1, 2))
    assert metrics["top-1"] == pytest.approx(3 / 4)
    assert metrics["top-2"] == pytest.approx(3 / 4 + 1 / 4 * 1 / 2)  # classes 1 and 2 tie for image 3's 2nd slot


# ---------------------------------------------------------------- class names, templates, labels


def test_shipped_class_names_are_the_world_shapes():
    assert read_classnames(ROOT / "configs" / "classnames" / "synth_shapes.txt") == list(SHAPES)
    assert read_classnames(FIXTURES / "animals.txt") == ["cat", "dog", "bird"]


@pytest.mark.parametrize("name, message", [
    ("blank_line.txt", "line 2 is blank"),
    ("duplicate.txt", r"line 3 repeats line 1 \('cat'\)"),
    ("empty.txt", "is empty"),
    ("missing.txt", "class names file not found"),
])
def test_bad_class_name_files(name, message):
    with pytest.raises(InputError, match=message):
        read_classnames(FIXTURES / name)


def test_templates(tmp_path):
    assert read_templates(None) == list(DEFAULT_TEMPLATES)
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\na sketch of a {}.\n")
    assert read_templates(good) == ["a photo of a {}.", "a sketch of a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na sketch\n")
    with pytest.raises(InputError, match=r"line 2 needs exactly one '\{\}'"):
        read_templates(bad)


@pytest.mark.parametrize("entry, message", [
    ({"image": "x.png", "label": "horse"}, "label 'horse' is not among the class names"),
    ({"image": "x.png", "label": 3}, "label 3 is outside the 3 class names"),
    ({"image": "x.png", "label": [1]}, "'label' must be a class name or a class index"),
    ({"image": "x.png"}, "no 'label'"),
    ({"label": "cat"}, "expected a JSON object with an 'image' path"),
])
def test_bad_labels_name_the_line(tmp_path, entry, message):
    file = tmp_path / "labels.jsonl"
    file.write_text(json.dumps({"image": "ok.png", "label": "cat"}) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(InputError, match=f"labels.jsonl:2: {message}"):
        labelled_images(file, "test", ["cat", "dog", "bird"])


# ---------------------------------------------------------------- towers and `llm2clip eval` on tiny models


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny CLIP's tokenizer: byte-level BPE over a few caption words that wraps texts in BOS ... EOS."""
    rng = random.Random(0)
    words = "a the red blue green circle square triangle star left right of above below and small large".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 10))) for _ in range(200)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[(token, backend.token_to_id(token)) for token in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, encoder_dir) -> dict[str, Path]:
    """A tiny world with one corrupt test image, the tiny LLM encoder, and tiny LLM2CLIP and CLIP checkpoints."""
    root = tmp_path_factory.mktemp("eval")
    generate_world(SynthConfig(out_dir=root / "world", n_train=2, n_val=1, n_test=8, image_size=32, max_objects=3))
    (root / "world" / "images" / "test" / "test-00003.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    llm2clip = LLM2CLIPModel(LLM2CLIPConfig(vision_config=TINY_VISION, text_embed_dim=32, adapter_hidden_dim=32,
                                            adapter_depth=1, projection_dim=16,
                                            text_encoder_name_or_path=str(encoder_dir)))
    llm2clip.save_pretrained(root / "llm2clip")
    tokenizer = build_tokenizer()
    text_config = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=TINY_VISION, projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return {"root": root, "world": root / "world", "llm": encoder_dir, "llm2clip": root / "llm2clip",
            "clip": root / "clip"}


def test_towers_give_normalised_features(tiny):
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 30), (10, 10, 200))]
    long_text = "a small red circle left of a large blue square and " * 20
    llm2clip = load_tower(tiny["llm2clip"])
    assert isinstance(llm2clip, LLM2CLIPTower)
    clip = load_tower(tiny["clip"])
    assert isinstance(clip, CLIPTower)
    for tower in (llm2clip, clip):
        image_features = tower.image_features(images)
        text_features = tower.text_features(["a red circle", long_text, "a blue square"])
        assert image_features.shape == (2, 16) and text_features.shape == (3, 16)
        assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(text_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.warns(UserWarning, match="1 of 2 texts were cut to CLIP's 77 tokens"):
        clip.text_features(["a red circle", long_text])


def test_llm2clip_tower_needs_a_matching_text_encoder(tiny, tmp_path):
    LLM2CLIPModel(LLM2CLIPConfig(vision_config=TINY_VISION, text_embed_dim=24, adapter_hidden_dim=32, adapter_depth=1,
                                 projection_dim=16)).save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="names no text encoder"):
        load_tower(tmp_path / "m")
    with pytest.raises(InputError, match="gives 32-dim embeddings but the LLM2CLIP adapter expects 24"):
        load_tower(tmp_path / "m", text_encoder=tiny["llm"])


def test_llm2clip_tower_refuses_another_encoder_and_keeps_the_cache_settings(tiny, tmp_path):
    config = LLM2CLIPConfig.from_pretrained(tiny["llm2clip"])
    config.text_encoder_fingerprint = weight_hash(tiny["llm"])
    config.text_encoder_max_length = 20
    model = LLM2CLIPModel.from_pretrained(tiny["llm2clip"], config=config)
    model.save_pretrained(tmp_path / "same")
    tower = load_tower(tmp_path / "same")
    assert tower.encoder.max_length == 20  # as the cache embedded the captions, not the encoder's own 512
    other = shutil.copytree(tiny["llm"], tmp_path / "other-encoder")
    (other / "llm2vec_config.json").write_text(json.dumps({"pooling_mode": "eos_token"}))
    with pytest.raises(InputError, match="trained on the embeddings of an encoder with fingerprint"):
        load_tower(tmp_path / "same", text_encoder=other)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="model_type 'bert' cannot be evaluated"):
        load_tower(tmp_path)
    with pytest.raises(InputError, match="no config.json"):
        load_tower(tmp_path / "nothing")


def test_eval_command_on_a_tiny_world(tiny, capsys):
    out = tiny["root"] / "report"
    code = cli.main(["eval", "--models", f"{tiny['llm2clip']},{tiny['clip']}", "--names", "LLM2CLIP,CLIP",
                     "--data", str(tiny["world"]), "--out", str(out), "batch_size=4"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text() in printed
    assert report["skipped_images"]["count"] == 1 and "test-00003.png" in report["skipped_images"]["reasons"][0]
    assert list(report["tasks"]) == list(TASKS)
    assert report["tasks"]["retrieval_short"] == {"images": 7, "texts": 28}  # 4 captions per readable image
    assert report["tasks"]["retrieval_long"] == {"images": 7, "texts": 14}  # 2 long captions per image
    assert report["tasks"]["retrieval_translated"] == {"images": 7, "texts": 28}
    assert report["tasks"]["retrieval_translated_long"] == {"images": 7, "texts": 7}
    assert report["tasks"]["zeroshot"] == {"images": 7, "classes": 6}
    assert report["tasks"]["cra"] == {"pairs": 7}
    assert 0 <= report["cra_bag_of_words"] <= 1
    assert [(m["name"], m["type"]) for m in report["models"]] == [("LLM2CLIP", "llm2clip"), ("CLIP", "clip")]
    for model in report["models"]:
        assert set(model["metrics"]) == set(TASKS)
        assert set(model["metrics"]["retrieval_long"]) == {f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        assert model["metrics"]["retrieval_short"]["t2i R@10"] == 1.0  # only 7 images to rank: every text hits
        values = [v for task in model["metrics"].values() for v in task.values()]
        assert all(0 <= v <= 1 and not math.isnan(v) for v in values)
    table = (out / "report.md").read_text().splitlines()
    assert table[2].startswith("| model | short i2t R@1 | short t2i R@1 | long i2t R@1")
    assert table[4].startswith("| LLM2CLIP | ") and table[5].startswith("| CLIP | ")
    # Chance beside every metric: 1/6 top-1 and 5/6 top-5 over the 6 shapes, 1/7 R@1 among 7 images.
    assert report["chance"]["zeroshot"] == {"top-1": pytest.approx(1 / 6), "top-5": pytest.approx(5 / 6)}
    assert report["chance"]["retrieval_short"]["t2i R@1"] == pytest.approx(1 / 7)
    assert report["chance"]["retrieval_long"]["i2t R@1"] == pytest.approx(1 / 7)
    assert report["chance"]["cra"] == {"cra": pytest.approx(1 / 7)}
    assert table[6] == "| chance | " + " | ".join(["14.3"] * 8 + ["16.7", "83.3", "14.3"]) + " |"
    assert "skipped 1 unreadable image" in printed


def test_eval_skips_tasks_the_data_cannot_serve(tiny):
    config = EvalConfig(models=[str(tiny["clip"])], data=tiny["world"] / "karpathy.json",
                        tasks=["retrieval_short", "retrieval_translated"], max_images=3, out_dir=tiny["root"] / "k")
    report = evaluate(config)
    assert report["tasks"]["retrieval_short"] == {"images": 3, "texts": 12}
    assert "skipped" in report["tasks"]["retrieval_translated"]
    assert set(report["models"][0]["metrics"]) == {"retrieval_short"}
    assert "retrieval_translated: skipped" in markdown(report)


@pytest.mark.parametrize("args, message", [
    (["models=a,b", "tasks=retrieval,zeroshot"], "unknown task(s) retrieval"),
    (["models=a,b", "names=a"], "1 names for 2 models"),
    (["models=[]"], "no models given"),
    (["models=a", "classnames=/no/such.txt", "tasks=zeroshot"], "class names file not found"),
    (["models=a", "tasks=retrieval_short"], "a: no config.json"),
])
def test_eval_bad_config_is_one_line_error(tiny, capsys, args, message):
    assert cli.main(["eval", "--data", str(tiny["world"]), *args]) == 1
    assert message in capsys.readouterr().err


def test_default_names_are_the_shortest_distinct_path_endings():
    config = EvalConfig(models=["runs/stage2/llm2clip/final", "runs/stage2/clip/final", "other/x"])
    assert display_names(config) == ["llm2clip/final", "clip/final", "other/x"]
    assert display_names(EvalConfig(models=["a/m", "m"])) == ["a/m", "m"]


def test_tiny_eval_config_matches_the_defaults():
    assert load_config(EvalConfig, ROOT / "configs" / "tiny-eval.yaml") == EvalConfig()
