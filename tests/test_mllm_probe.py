"""mllm probe and mllm oracle: cell pooling, the majority floor, probes that read what the features carry,
an oracle tower whose LLaVA features are exactly the scene's code, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_mllm_data import make_llm, make_tower

from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.errors import InputError
from mllm import cli
from mllm.builder import BuildSettings, build_llava
from mllm.oracle import FEATURES, OracleConfig, build_oracle, oracle_image, scene_codes
from mllm.probe import (
    ProbeConfig,
    cell_pooling,
    majority_floor,
    probe,
    probe_attributes,
    read_scenes,
    scene_labels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Enough scenes for a probe to generalise: 160 train and 40 test images of 32 px."""
    out = tmp_path_factory.mktemp("probe-world")
    generate_world(SynthConfig(out_dir=out, n_train=160, n_val=4, n_test=40, image_size=32))
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, world) -> Path:
    out = tmp_path_factory.mktemp("oracle")
    build_oracle(OracleConfig(world=world, out_dir=out))
    return out


def test_cell_pooling_weighs_patches_by_their_share_of_the_cell():
    assert torch.equal(cell_pooling(3), torch.eye(9))
    six = cell_pooling(6).view(9, 6, 6)
    assert torch.allclose(six[4, 2:4, 2:4], torch.full((2, 2), 0.25)) and six[4].sum() == 1 and six[4, 0, 0] == 0
    # 4x4 patches over 3x3 cells: the first cell holds 3/4 of patch 0 and 1/4 of patch 1 along each axis.
    four = cell_pooling(4).view(9, 4, 4)
    assert torch.allclose(four[0, :2, :2], torch.tensor([[0.5625, 0.1875], [0.1875, 0.0625]]))
    assert torch.allclose(cell_pooling(4).sum(dim=1), torch.ones(9))


def test_majority_floor_is_the_train_majority_scored_on_test():
    train, test = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
    assert majority_floor(train, test) == 0.25  # the test split's own majority (1) would score 0.75


def test_labels_place_each_object_in_its_cell(world):
    scenes = read_scenes(world, "test", limit=3)
    record = json.loads((world / "test.jsonl").read_text().splitlines()[0])
    labels = scene_labels(scenes)
    assert labels["count"][0] == len(record["objects"]) == labels["occupancy"][0].sum()
    for obj in record["objects"]:
        cell = obj["cell"][0] * 3 + obj["cell"][1]
        assert labels["occupancy"][0, cell] == 1 and scenes[0].cells[cell] == obj
    assert (labels["color"][0] == -1).sum() == 9 - len(record["objects"])


def _fake_tower_cells(scenes, mixing: torch.Tensor, noise: float) -> torch.Tensor:
    """[N, 9, 32]: each cell's one-hot code through a fixed random linear map, plus Gaussian noise."""
    codes = torch.stack([scene_codes(s.cells) for s in scenes])
    return codes @ mixing + noise * torch.randn(*codes.shape[:2], mixing.shape[1])


def test_probe_reads_labels_that_features_carry_linearly_above_the_floor(world):
    train, test = read_scenes(world, "train"), read_scenes(world, "test")
    torch.manual_seed(0)
    mixing = torch.randn(FEATURES, 32)
    results = probe_attributes(_fake_tower_cells(train, mixing, 0.3), train, _fake_tower_cells(test, mixing, 0.3),
                               test, l2=1e-2, steps=100)
    for name in ("occupancy", "color", "shape", "size"):
        assert results[name]["accuracy"] >= 0.9 and results[name]["accuracy"] > results[name]["floor"], name
    assert results["occupancy"]["test_examples"] == 9 * len(test)
    assert results["color"]["test_examples"] == sum(cell is not None for s in test for cell in s.cells)


def test_probe_on_noise_stays_near_the_floor(world):
    train, test = read_scenes(world, "train"), read_scenes(world, "test")
    torch.manual_seed(0)
    noise = probe_attributes(torch.randn(len(train), 9, 8), train, torch.randn(len(test), 9, 8), test,
                             l2=1.0, steps=50)
    assert noise["color"]["accuracy"] < noise["color"]["floor"] + 0.15


def test_oracle_tower_hands_llava_the_scene_code(oracle, world, tmp_path):
    """Through the Llava's own processor and its vision_feature_layer: layer -2 patch tokens are [code, 1 - code]."""
    llava, processor = build_llava(BuildSettings(vision_tower=oracle / "tower", llm=make_llm(tmp_path / "llm")))
    scenes = read_scenes(oracle / "world", "train", limit=8)
    assert [s.cells for s in scenes] == [s.cells for s in read_scenes(world, "train", limit=8)]
    pixels = processor.image_processor([Image.open(s.image) for s in scenes], return_tensors="pt").pixel_values
    hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    tokens = hidden[llava.config.vision_feature_layer][:, 1:]  # "default": the CLS token dropped
    codes = torch.stack([scene_codes(s.cells) for s in scenes])
    assert tokens.shape == (8, 9, 2 * FEATURES)
    assert torch.allclose(tokens, torch.cat([codes, 1 - codes], dim=-1), atol=1e-5)
    # The code: occupied, then one-hot colour, shape and size; an empty cell is all zeros.
    obj = {"color": "red", "shape": "square", "size": "large", "cell": [0, 0]}
    assert scene_codes([obj] + [None] * 8)[0].nonzero().flatten().tolist() == [0, 1, 10, 17]
    assert scene_codes([obj] + [None] * 8)[1].sum() == 0
    assert oracle_image([obj] + [None] * 8).size == (24, 24)


def test_probe_reads_every_cell_attribute_from_the_oracle_tower(oracle, tmp_path, capsys):
    assert cli.main(["probe", "--tower", str(oracle / "tower"), "--world", str(oracle / "world"),
                     "--out", str(tmp_path / "probe")]) == 0
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["patch_tokens"] == 9 and report["feature_dim"] == 2 * FEATURES
    results = report["attributes"]
    for name in ("occupancy", "color", "shape", "size"):
        assert results[name]["accuracy"] == 1.0, (name, results[name])
        assert results[name]["floor"] < 0.9
    assert results["count"]["accuracy"] > results["count"]["floor"] + 0.2
    table = (tmp_path / "probe" / "probe.md").read_text()
    assert "| color | " in table and "majority floor" in table and "| color | " in capsys.readouterr().out


def test_probe_of_a_random_tower_runs_and_writes_its_report(world, tmp_path):
    tower = make_tower(tmp_path / "tower")  # 32 px, patch 8: 4x4 patches pooled into 3x3 cells
    report = probe(ProbeConfig(tower=tower, world=world, max_train=40, max_test=10, steps=20,
                               out_dir=tmp_path / "out"))
    assert (report["train_images"], report["test_images"], report["patch_tokens"]) == (40, 10, 16)
    assert set(report["attributes"]) == {"occupancy", "color", "shape", "size", "count"}


def test_probe_errors_are_one_line(world, tmp_path, capsys):
    tower = make_tower(tmp_path / "tower")
    with pytest.raises(InputError, match="vision tower directory not found: .*nowhere"):
        probe(ProbeConfig(tower=tmp_path / "nowhere", world=world))
    with pytest.raises(InputError, match=r"nowhere/train.jsonl not found: .* is not a synthetic world"):
        probe(ProbeConfig(tower=tower, world=tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"dev.jsonl not found: .* with a 'dev' split"):
        probe(ProbeConfig(tower=tower, world=world, test_split="dev"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text(json.dumps({"image": "x.png", "objects": [
        {"shape": "blob", "color": "red", "size": "small", "cell": [0, 0]}]}) + "\n")
    with pytest.raises(InputError, match=r"train.jsonl line 1: object shape 'blob' is not one of circle"):
        read_scenes(broken, "train")
    capsys.readouterr()
    assert cli.main(["probe", "--tower", str(tmp_path / "nowhere"), "--world", str(world)]) == 1
    assert capsys.readouterr().err.strip() == f"mllm probe: error: vision tower directory not found: {tmp_path / 'nowhere'}"


def test_oracle_needs_a_world(tmp_path):
    with pytest.raises(InputError, match="is not a synthetic world: it has none of train.jsonl"):
        build_oracle(OracleConfig(world=tmp_path, out_dir=tmp_path / "out"))
