"""`mllm oracle`: a diagnostic world and vision tower that hand LLaVA's projector a perfect encoding of each scene.

If LLaVA on this tower still cannot answer, the failure is the LLM, the template, the label masking or the
training budget, not the tower. It is a diagnostic only: it writes new directories and changes nothing in
the normal pipeline.

The design keeps the trained model a plain HF Llava. The scene is written into the pixels, and a
hand-set `CLIPVisionModel` passes them through:

- The oracle image of a scene is a 3x3 grid of PATCH x PATCH pixel blocks, one per grid cell, so the
  tower's patch grid is the scene's grid: one image token per cell. Cell k's features are the one-hot
  code `occupied | color | shape | size` (FEATURES = 1 + 8 + 6 + 3 = 18 bits, all zero on an empty
  cell). Bit j sits at pixel (j // PATCH, j % PATCH) of the cell's block: the red channel holds the bit,
  the green channel its complement (0 or 255 each), blue is 0.
- The image processor neither resizes (the image is already its size), pads (it is square) nor shifts
  (mean 0, std 1), so pixel values are exactly 0 or 1.
- The tower has one encoder layer, so the hidden state LLaVA reads (layer -2) is its pre-layernormed
  patch embedding. The patch convolution copies the red bits into channels 0..17 and the green ones into
  18..35, position embeddings are zero, and the pre-layernorm undoes itself: every token holds as many
  ones as zeros, so its mean is 1/2 and its deviation 1/2, and weight 1/2 with bias 1/2 maps the
  normalised +-1 back to 0/1. The class token is set the same way. The encoder layer is all zeros (it
  adds nothing; LLaVA drops its output anyway).

So the projector receives, per cell, [code, 1 - code]: the one-hot encoding and its complement (an
affine function of it, which a linear layer reads as easily).

Outputs under out_dir:
    tower/   the CLIPVisionModel with its preprocessor_config.json (a `--vision-tower` for `mllm pretrain`)
    world/   images/<split>/<id>.png: the oracle images at the world's image paths, beside copies of the
             world's <split>.jsonl records and llava/ data (an `--image-folder` and `--world` for the mllm
             commands, or DATA for scripts/train_llava.sh)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llm2clip.data.vocabulary import COLORS, SHAPES, SIZES
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from mllm.probe import GRID, read_scenes

PATCH = 8  # pixels per cell side; PATCH * PATCH >= FEATURES
FEATURES = 1 + len(COLORS) + len(SHAPES) + len(SIZES)
IMAGE_SIZE = GRID * PATCH
SPLITS = ("train", "val", "test")


@dataclass
class OracleConfig:
    world: Path = Path("runs/world")  # the synthetic world whose scenes are encoded
    out_dir: Path = Path("runs/oracle")


def cell_code(obj: dict | None) -> torch.Tensor:
    """[FEATURES] one-hot code of a cell: occupied, then its object's color, shape and size."""
    code = torch.zeros(FEATURES)
    if obj is not None:
        code[0] = 1
        code[1 + COLORS.index(obj["color"])] = 1
        code[1 + len(COLORS) + SHAPES.index(obj["shape"])] = 1
        code[1 + len(COLORS) + len(SHAPES) + SIZES.index(obj["size"])] = 1
    return code


def scene_codes(cells: list[dict | None]) -> torch.Tensor:
    """[GRID*GRID, FEATURES]: the cells' codes, row by row."""
    return torch.stack([cell_code(obj) for obj in cells])


def oracle_image(cells: list[dict | None]) -> Image.Image:
    """The scene's codes as pixels: bit j of cell k at pixel (j // PATCH, j % PATCH) of the cell's block."""
    pixels = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    for k, code in enumerate(scene_codes(cells)):
        row, col = divmod(k, GRID)
        block = torch.zeros(PATCH * PATCH, 3, dtype=torch.uint8)
        block[:FEATURES, 0] = (code * 255).to(torch.uint8)
        block[:FEATURES, 1] = ((1 - code) * 255).to(torch.uint8)
        pixels[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = block.view(PATCH, PATCH, 3)
    return Image.fromarray(pixels.numpy())


def oracle_tower() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A one-layer CLIP ViT whose layer -2 patch tokens are [code, 1 - code] of each cell, and its processor."""
    config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, hidden_size=2 * FEATURES,
                              intermediate_size=4, num_hidden_layers=1, num_attention_heads=1, layer_norm_eps=1e-12)
    model = CLIPVisionModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        embeddings = model.embeddings
        rows, cols = torch.arange(FEATURES) // PATCH, torch.arange(FEATURES) % PATCH
        embeddings.patch_embedding.weight[torch.arange(FEATURES), 0, rows, cols] = 1.0
        embeddings.patch_embedding.weight[FEATURES + torch.arange(FEATURES), 1, rows, cols] = 1.0
        embeddings.class_embedding[:FEATURES] = 1.0  # half ones, so the layernorm sees a spread
        model.pre_layrnorm.weight.fill_(0.5)
        model.pre_layrnorm.bias.fill_(0.5)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                   "width": IMAGE_SIZE}, resample=Image.Resampling.NEAREST,
                                   image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    return model.eval(), processor


def build_oracle(config: OracleConfig) -> dict:
    world, out = Path(config.world), Path(config.out_dir)
    splits = [split for split in SPLITS if (world / f"{split}.jsonl").is_file()]
    if not splits:
        raise InputError(f"{world} is not a synthetic world: it has none of {', '.join(f'{s}.jsonl' for s in SPLITS)}")
    if not (world / "llava").is_dir():
        raise InputError(f"{world} has no llava/ folder (LLaVA pretraining, instruction and QA data)")
    model, processor = oracle_tower()
    with atomic_dir(out / "tower") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    counts = {}
    with atomic_dir(out / "world") as tmp:
        for split in splits:
            scenes = read_scenes(world, split)
            for scene in scenes:
                image = tmp / scene.image.relative_to(world)  # the world's own image path
                image.parent.mkdir(parents=True, exist_ok=True)
                oracle_image(scene.cells).save(image)
            shutil.copy2(world / f"{split}.jsonl", tmp / f"{split}.jsonl")
            counts[split] = len(scenes)
        shutil.copytree(world / "llava", tmp / "llava")
    print(f"mllm oracle: wrote {out / 'tower'} ({IMAGE_SIZE} px, {GRID * GRID} tokens of {2 * FEATURES} features) "
          f"and {out / 'world'} ({', '.join(f'{s} {n}' for s, n in counts.items())} oracle images)")
    return {"tower": str(out / "tower"), "world": str(out / "world"), "images": counts}
