"""`mllm probe`: linear probes from a vision tower's LLaVA features to the synthetic world's scene attributes.

It asks whether the tower's output carries what the QA asks about: if a linear probe cannot read an
object's colour, the tower is the problem; if it can, the LLaVA side is. The features are those
LLaVA's projector reads: the hidden state of `vision_feature_layer` (LLaVA-1.5: -2, the penultimate)
with the CLS token dropped (`vision_feature_select_strategy="default"`), of images prepared by the
image processor the Llava gets (padded to a square, resized, cropped, normalised).

Features per grid cell: the patch tokens are averaged over each of the world's 3x3 cells, each patch
weighted by its share inside the cell. Pooled rather than flattened because the projector maps every
token with the same weights, so one probe shared by the nine cells asks what the projector can read,
and because pooling gives nine examples of D features per image instead of one of P*D, so the probes
do not overfit a few thousand images.

    occupancy             every cell: empty or occupied
    color, shape, size    every occupied cell: its object's attribute
    count                 every image, from the sum of its nine cell features: if a shared linear probe
                          reads each cell's occupancy, the same probe on the sum reads the count

Each probe is a multinomial logistic regression with an L2 penalty, fitted with LBFGS on features
standardised with the train split's statistics. It is scored by test accuracy beside the majority-class
floor: the train split's most common label predicted for every test example.
Writes out_dir/probe.json and out_dir/probe.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from llm2clip.config import config_to_dict
from llm2clip.data.records import read_jsonl
from llm2clip.data.vocabulary import COLORS, SHAPES, SIZES
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json, atomic_write_text
from mllm.backbones import vision_backbone

GRID = 3  # the world's scenes are a 3x3 grid of cells
CELL_ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
OCCUPANCY = ("empty", "occupied")
COUNTS = tuple(str(n) for n in range(GRID * GRID + 1))
ATTRIBUTES = ("occupancy", *CELL_ATTRIBUTES, "count")


@dataclass
class ProbeConfig:
    tower: Path = Path("runs/stage2/llm2clip/vision_tower")  # a CLIPVisionModel (or CLIPModel) directory
    vision_backbone: str = "clip"  # names in mllm.backbones
    world: Path = Path("runs/world")  # a synthetic world: <split>.jsonl records and their images
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = 2000  # the first N train images; None: all
    max_test: int | None = None  # the first N test images; None: all
    vision_feature_layer: int = -2  # as the Llava reads it (mllm.builder.BuildSettings)
    l2: float = 1e-3  # L2 penalty on the probe weights (times half their squared norm)
    steps: int = 300  # LBFGS iterations per probe
    batch_size: int = 64  # images per tower forward pass
    device: str = "cpu"
    out_dir: Path = Path("runs/probe")


@dataclass
class Scene:
    image: Path
    cells: list[dict | None]  # GRID * GRID cells, row by row: the object there, or None


def read_scenes(world: Path, split: str, limit: int | None = None) -> list[Scene]:
    """The first `limit` records of `<world>/<split>.jsonl`, each object placed in its cell."""
    path = Path(world) / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path} not found: {world} is not a synthetic world with a {split!r} split")
    if limit is not None and limit < 1:
        raise InputError(f"the number of {split} images must be at least 1, got {limit}")
    scenes = []
    for line, record in read_jsonl(path):
        if limit is not None and len(scenes) == limit:
            break
        where = f"{path} line {line}"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                or not isinstance(record.get("objects"), list):
            raise InputError(f"{where}: need a JSON object with 'image' and an 'objects' list")
        cells: list[dict | None] = [None] * (GRID * GRID)
        for obj in record["objects"]:
            cells[_cell_index(obj, where)] = obj
        image = Path(world) / record["image"]
        if not image.is_file():
            raise InputError(f"{where}: image {image} not found")
        scenes.append(Scene(image, cells))
    if not scenes:
        raise InputError(f"{path} holds no records")
    return scenes


def _cell_index(obj: object, where: str) -> int:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: an object must be a JSON object, got {obj!r}")
    for key, values in CELL_ATTRIBUTES.items():
        if obj.get(key) not in values:
            raise InputError(f"{where}: object {key} {obj.get(key)!r} is not one of {', '.join(values)}")
    cell = obj.get("cell")
    if not (isinstance(cell, list) and len(cell) == 2 and all(isinstance(v, int) and 0 <= v < GRID for v in cell)):
        raise InputError(f"{where}: object cell {cell!r} is not [row, col] with both in 0..{GRID - 1}")
    return cell[0] * GRID + cell[1]


def cell_pooling(patch_grid: int) -> torch.Tensor:
    """[GRID*GRID, patch_grid**2] weights: row k averages the patches over cell k by their share of its area."""
    edges = torch.arange(patch_grid + 1, dtype=torch.float64) / patch_grid
    cells = torch.arange(GRID + 1, dtype=torch.float64) / GRID
    # overlap[c, p]: length of patch interval p inside cell interval c, along one axis
    overlap = (torch.minimum(edges[None, 1:], cells[1:, None]) - torch.maximum(edges[None, :-1], cells[:-1, None]))
    overlap = overlap.clamp(min=0)
    weights = torch.einsum("rp,cq->rcpq", overlap, overlap).reshape(GRID * GRID, patch_grid * patch_grid)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def cell_features(patch_tokens: torch.Tensor) -> torch.Tensor:
    """[N, P, D] patch tokens of a square patch grid, row by row -> [N, GRID*GRID, D] cell means."""
    grid = round(patch_tokens.shape[1] ** 0.5)
    if grid * grid != patch_tokens.shape[1]:
        raise InputError(f"the tower gives {patch_tokens.shape[1]} patch tokens, not a square grid")
    return torch.einsum("cp,npd->ncd", cell_pooling(grid).to(patch_tokens), patch_tokens)


@torch.no_grad()
def tower_patch_tokens(config: ProbeConfig, images: list[Path]) -> torch.Tensor:
    """[N, P, D]: the tower's hidden state at `vision_feature_layer` without CLS, for each image."""
    vision = vision_backbone(config.vision_backbone).load(Path(config.tower), torch.float32)
    model = vision.model.to(config.device).eval()
    layers = model.config.num_hidden_layers
    if not -layers - 1 <= config.vision_feature_layer <= layers:
        raise InputError(f"vision_feature_layer {config.vision_feature_layer} is outside the tower's "
                         f"{layers + 1} hidden states (-{layers + 1}..{layers})")
    tokens = []
    for start in range(0, len(images), config.batch_size):
        batch = []
        for path in images[start:start + config.batch_size]:
            with Image.open(path) as image:
                batch.append(image.convert("RGB"))
        pixels = vision.image_processor(batch, return_tensors="pt").pixel_values.to(config.device)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        tokens.append(hidden[:, vision.num_additional_tokens:].float().cpu())
    return torch.cat(tokens)


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per attribute: [N, 9] for the cell ones (-1 on empty cells), [N] for count."""
    occupancy = torch.tensor([[cell is not None for cell in scene.cells] for scene in scenes], dtype=torch.long)
    labels = {"occupancy": occupancy, "count": occupancy.sum(dim=1)}
    for key, values in CELL_ATTRIBUTES.items():
        labels[key] = torch.tensor([[-1 if cell is None else values.index(cell[key]) for cell in scene.cells]
                                    for scene in scenes])
    return labels


def majority_floor(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Test accuracy of always answering the train split's most common label."""
    majority = Counter(train_labels.tolist()).most_common(1)[0][0]
    return (test_labels == majority).float().mean().item()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float, steps: int) -> nn.Linear:
    """Multinomial logistic regression on [N, D] features: cross-entropy plus l2/2 * |W|^2, by LBFGS."""
    probe = nn.Linear(features.shape[1], classes, dtype=features.dtype)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(features), labels) + 0.5 * l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   classes: int, l2: float, steps: int) -> float:
    """Test accuracy of a probe fitted on the train features, both standardised with the train statistics."""
    mean, std = train.mean(dim=0), train.std(dim=0, correction=0).clamp(min=1e-6)
    probe = fit_probe((train - mean) / std, train_labels, classes, l2, steps)
    with torch.no_grad():
        predicted = probe((test - mean) / std).argmax(dim=1)
    return (predicted == test_labels).float().mean().item()


def probe_attributes(train_cells: torch.Tensor, train_scenes: list[Scene], test_cells: torch.Tensor,
                     test_scenes: list[Scene], l2: float = 1e-3, steps: int = 300) -> dict[str, dict]:
    """Accuracy and floor per attribute, from [N, GRID*GRID, D] cell features of each split."""
    train_labels, test_labels = scene_labels(train_scenes), scene_labels(test_scenes)
    classes = {"occupancy": len(OCCUPANCY), "count": len(COUNTS), **{k: len(v) for k, v in CELL_ATTRIBUTES.items()}}
    results = {}
    for name in ATTRIBUTES:
        if name == "count":  # per image, from the sum of its cell features
            x_train, x_test = train_cells.sum(dim=1), test_cells.sum(dim=1)
            y_train, y_test = train_labels[name], test_labels[name]
        else:  # per cell; the object attributes on occupied cells only
            keep_train, keep_test = train_labels[name] >= 0, test_labels[name] >= 0
            x_train, y_train = train_cells[keep_train], train_labels[name][keep_train]
            x_test, y_test = test_cells[keep_test], test_labels[name][keep_test]
        results[name] = {
            "accuracy": round(probe_accuracy(x_train.double(), y_train, x_test.double(), y_test, classes[name],
                                             l2, steps), 4),
            "floor": round(majority_floor(y_train, y_test), 4),
            "train_examples": len(y_train),
            "test_examples": len(y_test),
        }
    return results


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| attribute | test examples | probe accuracy | majority floor | over the floor |",
            "|---|---:|---:|---:|---:|"]
    for name, row in results.items():
        gain = row["accuracy"] - row["floor"]
        rows.append(f"| {name} | {row['test_examples']} | {row['accuracy']:.3f} | {row['floor']:.3f} | {gain:+.3f} |")
    return "\n".join(rows) + "\n"


def probe(config: ProbeConfig) -> dict:
    if config.l2 < 0 or config.steps < 1 or config.batch_size < 1:
        raise InputError(f"need l2 >= 0, steps >= 1 and batch_size >= 1, got {config.l2}, {config.steps} and "
                         f"{config.batch_size}")
    tower = Path(config.tower)
    if not tower.is_dir():
        raise InputError(f"vision tower directory not found: {tower}")
    train = read_scenes(config.world, config.train_split, config.max_train)
    test = read_scenes(config.world, config.test_split, config.max_test)
    tokens = tower_patch_tokens(config, [scene.image for scene in train + test])
    cells = cell_features(tokens)
    results = probe_attributes(cells[:len(train)], train, cells[len(train):], test, config.l2, config.steps)
    report = {
        "tower": str(tower),
        "world": str(config.world),
        "features": f"hidden state {config.vision_feature_layer}, CLS dropped, patch tokens averaged per grid cell",
        "feature_dim": tokens.shape[-1],
        "patch_tokens": tokens.shape[1],
        "train_images": len(train),
        "test_images": len(test),
        "attributes": results,
        "config": config_to_dict(config),
    }
    out = Path(config.out_dir)
    atomic_write_json(out / "probe.json", report)
    table = markdown_table(results)
    atomic_write_text(out / "probe.md", f"# Linear probe of {tower}\n\n{report['features']}; "
                                        f"{len(train)} train and {len(test)} test images.\n\n{table}")
    print(table, end="")
    print(f"mllm probe: wrote {out / 'probe.json'} and {out / 'probe.md'}")
    return report
