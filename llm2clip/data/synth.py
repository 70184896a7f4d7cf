"""`llm2clip synth`: a seeded world of coloured shapes on a 3x3 grid, written in real data formats.

Per image: PNG, paraphrased short captions, long captions describing every object (written
independently, as by different captioners), French renderings of the short captions and of the
first long one, and questions. Each scene has salient content, as a photo does: its main object is
drawn large, the second medium and the others small, and the short captions name what stands out
(the two main objects and their relation, sometimes the count or the background), all of which
each long caption says too. A share of scenes is followed by a twin with the colours or the
positions of its two main objects swapped, so their captions share every word and differ only in
binding. Outputs under `out_dir`: images/<split>/<id>.png, <split>.jsonl, karpathy.json,
llava/{pretrain,finetune}.json, llava/qa_{val,test}.jsonl, corpus.txt and world.json (last).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from llm2clip.config import config_to_dict
from llm2clip.data.vocabulary import (
    BACKGROUNDS,
    COLORS,
    EN,
    SHAPES,
    Obj,
    Scene,
    generic_sentences,
    long_caption,
    questions,
    relation,
    short_captions,
)
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

# 2: `long_captions` (a list) replaces `long_caption`; 3: relations follow each object;
# 4: salient main objects (sizes by rank), short captions about them, backgrounds; 5: instruction data asks
# for a short answer once per conversation, and 10% of conversations (not 25%) add a detailed description;
# 6: questions as in VQAv2, mostly about what stands out, plus a hard "binding" category
FORMAT_VERSION = 6
SPLITS = ("train", "val", "test")
RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "purple": (140, 60, 200),
    "pink": (250, 120, 190),
    "white": (240, 240, 240),
}
BACKGROUND_RGB = {"gray": (35, 35, 35), "blue": (20, 28, 72), "green": (22, 56, 30), "brown": (62, 40, 22)}
# Diameter / cell width. Each step is about 1.7x, so that the larger object also covers more pixels
# whatever the two shapes (a triangle fills 41% of its circumscribed disc, a circle all of it).
SIZE_FRACTION = {"small": 0.33, "medium": 0.56, "large": 0.94}
RANK_SIZES = ("large", "medium")  # sizes of objects[0] and objects[1]; the others are small
BRIEF_PROMPTS = [
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "Summarize the picture in a few words.",
    "What does this image show? Answer briefly.",
]
DETAIL_PROMPT = "Describe the image in detail."
DETAIL_SHARE = 0.1  # conversations that also ask for a long caption, as LLaVA's detailed-description data
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclass
class SynthConfig:
    out_dir: Path = Path("runs/world")
    seed: int = 0
    n_train: int = 6000
    n_val: int = 500
    n_test: int = 500
    image_size: int = 64  # pixels, 32..336
    min_objects: int = 3  # 3..9 objects: long captions run about twice CLIP's 77 tokens (median ~150)
    max_objects: int = 9  # at most 9 (one per grid cell)
    n_captions: int = 4  # short captions per image, 1..5
    n_long_captions: int = 2  # long captions per image, 1..3, each its own wording and object order
    twin_prob: float = 0.3  # chance that a scene is followed by its attribute-swapped twin
    overwrite: bool = False  # replace a world made with another config


@dataclass(frozen=True)
class Look:
    """How one object is drawn beyond what the captions say."""

    dx: float  # offset inside the cell, as a fraction (-1..1) of the free room
    dy: float
    angle: float  # degrees
    tint: tuple[int, int, int]


@dataclass(frozen=True)
class Picture:
    scene: Scene
    looks: tuple[Look, ...]
    background: tuple[int, int, int]
    text_seed: str  # shared by twins, so their captions use the same words
    twin: int | None = None  # index of the twin in the split


def _check(config: SynthConfig) -> None:
    problems = []
    if not 32 <= config.image_size <= 336:
        problems.append(f"image_size must be in 32..336, got {config.image_size}")
    if not 1 <= config.min_objects <= config.max_objects <= 9:
        problems.append(f"need 1 <= min_objects <= max_objects <= 9, got {config.min_objects} and {config.max_objects}")
    if not 1 <= config.n_captions <= 5:
        problems.append(f"n_captions must be in 1..5, got {config.n_captions}")
    if not 1 <= config.n_long_captions <= 3:
        problems.append(f"n_long_captions must be in 1..3, got {config.n_long_captions}")
    if not 0.0 <= config.twin_prob <= 1.0:
        problems.append(f"twin_prob must be in 0..1, got {config.twin_prob}")
    for split in SPLITS:
        if getattr(config, f"n_{split}") < 1:
            problems.append(f"n_{split} must be at least 1")
    if problems:
        raise InputError("synth config: " + "; ".join(problems))


def _sample(rng: random.Random, config: SynthConfig, text_seed: str) -> Picture:
    n = rng.randint(config.min_objects, config.max_objects)
    cells = rng.sample(range(9), n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # distinct (colour, shape) pairs
    sizes = [*RANK_SIZES, *["small"] * n][:n]
    objects = tuple(Obj(shape, color, size, cell) for (color, shape), cell, size in zip(kinds, cells, sizes))
    rel = relation(objects[0], objects[1], vertical=rng.random() < 0.5) if n > 1 else None
    looks = tuple(
        Look(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-15, 15), tuple(rng.randint(-20, 20) for _ in range(3)))
        for _ in objects
    )
    background = rng.choice(BACKGROUNDS)
    shade = rng.randint(-12, 12)
    rgb = tuple(max(0, c + shade + rng.randint(-6, 6)) for c in BACKGROUND_RGB[background])
    return Picture(Scene(objects, rel, background), looks, rgb, text_seed)


def _twin_objects(scene: Scene, kind: str) -> tuple[Obj, ...]:
    a, b, *rest = scene.objects
    if kind == "color":
        return (replace(a, color=b.color), replace(b, color=a.color), *rest)
    # Swap the places, the sizes and the order: "A left of B" becomes "B left of A", with the same words.
    return (replace(b, cell=a.cell, size=a.size), replace(a, cell=b.cell, size=b.size), *rest)


def _twin_kinds(scene: Scene) -> list[str]:
    kinds = ["position"]
    swapped = _twin_objects(scene, "color")
    if scene.objects[0].color != scene.objects[1].color and len({(o.color, o.shape) for o in swapped}) == len(swapped):
        kinds.insert(0, "color")
    return kinds


def sample_split(config: SynthConfig, split: str, count: int) -> list[Picture]:
    pictures: list[Picture] = []
    while len(pictures) < count:
        index = len(pictures)
        rng = random.Random(f"{config.seed}/{split}/{index}")
        picture = _sample(rng, config, text_seed=f"{config.seed}/{split}/{index}")
        has_room = index + 1 < count and len(picture.scene.objects) > 1
        if has_room and rng.random() < config.twin_prob:
            kind = rng.choice(_twin_kinds(picture.scene))
            scene = replace(picture.scene, twin_kind=kind)
            twin_scene = replace(scene, objects=_twin_objects(scene, kind))
            pictures.append(replace(picture, scene=scene, twin=index + 1))
            pictures.append(replace(picture, scene=twin_scene, twin=index))
        else:
            pictures.append(picture)
    return pictures


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape with circumradius `r`, rotated by `angle` degrees."""
    if shape == "star":
        polar = [(-90 + 36 * k, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    elif shape == "cross":
        w = 0.32 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        polar = [(math.degrees(math.atan2(y, x)), math.hypot(x, y)) for x, y in corners]
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        start = {"square": 45, "triangle": -90, "hexagon": 0}[shape]
        polar = [(start + 360 * k / sides, r) for k in range(sides)]
    return [
        (cx + rad * math.cos(math.radians(deg + angle)), cy + rad * math.sin(math.radians(deg + angle)))
        for deg, rad in polar
    ]


def draw(picture: Picture, size: int) -> tuple[bytes, list[list[int]]]:
    """PNG bytes of the picture (drawn supersampled, then reduced) and each object's pixel bbox."""
    factor = max(2, 256 // size)
    canvas = Image.new("RGB", (size * factor, size * factor), picture.background)
    pen = ImageDraw.Draw(canvas)
    cell = size * factor / 3
    boxes = []
    for obj, look in zip(picture.scene.objects, picture.looks):
        diameter = cell * SIZE_FRACTION[obj.size]
        room = (cell - diameter) / 2
        cx = (obj.col + 0.5) * cell + look.dx * room
        cy = (obj.row + 0.5) * cell + look.dy * room
        r = diameter / 2
        fill = tuple(min(255, max(0, c + t)) for c, t in zip(RGB[obj.color], look.tint))
        if obj.shape == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            pen.polygon(_outline(obj.shape, cx, cy, r, look.angle), fill=fill)
        boxes.append([round(v / factor) for v in (cx - r, cy - r, cx + r, cy + r)])
    buffer = io.BytesIO()
    canvas.reduce(factor).save(buffer, format="PNG")
    return buffer.getvalue(), boxes


def _record(picture: Picture, split: str, index: int, config: SynthConfig, boxes: list[list[int]]) -> dict:
    scene = picture.scene
    captions, captions_fr = short_captions(scene, picture.text_seed, config.n_captions)
    long_en, long_fr = long_caption(scene, picture.text_seed)
    more_long = [long_caption(scene, f"{picture.text_seed}/long-{k}")[0] for k in range(1, config.n_long_captions)]
    rng = random.Random(f"{config.seed}/{split}/{index}/qa")
    return {
        "id": _id(split, index),
        "image": f"images/{split}/{_id(split, index)}.png",
        "captions": captions,
        "long_captions": [long_en, *more_long],
        "captions_fr": captions_fr,
        "long_caption_fr": long_fr,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position, "cell": [o.row, o.col], "bbox": box}
            for o, box in zip(scene.objects, boxes)
        ],
        "relation": scene.relation,
        "background": scene.background,
        "twin": None if picture.twin is None else _id(split, picture.twin),
        "twin_kind": scene.twin_kind,
        "qa": questions(scene, rng),
    }


def _id(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def _karpathy(records: dict[str, list[dict]]) -> dict:
    images, sentid = [], 0
    for split in SPLITS:
        for record in records[split]:
            imgid = len(images)
            sentences = []
            for caption in record["captions"]:
                tokens = re.findall(r"[a-z0-9]+", caption.lower())
                sentences.append({"raw": caption, "tokens": tokens, "sentid": sentid, "imgid": imgid})
                sentid += 1
            images.append({
                "filepath": f"images/{split}",
                "filename": Path(record["image"]).name,
                "split": split,
                "imgid": imgid,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "cocoid": imgid,
            })
    return {"dataset": "synth", "images": images}


def _llava_pretrain(train: list[dict], rng: random.Random) -> list[dict]:
    return [
        {
            "id": r["id"],
            "image": r["image"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(BRIEF_PROMPTS)},
                {"from": "gpt", "value": rng.choice(r["captions"])},
            ],
        }
        for r in train
    ]


def _llava_finetune(train: list[dict], rng: random.Random) -> list[dict]:
    """Multi-turn QA about each image (LLaVA-1.5's VQA form), some with a detailed description, plus text-only turns.

    LLaVA-1.5 appends SHORT_ANSWER to every VQA question; here only the first question of a conversation
    carries it and the others follow its lead. The tiny LLM's BPE spells the instruction in 37 tokens, so on
    every turn it made a third of each conversation's tokens and of the finetuning time.
    """
    samples = []
    for r in train:
        turns = [(qa["question"], qa["answer"]) for qa in rng.sample(r["qa"], len(r["qa"]))]
        turns[0] = (turns[0][0] + SHORT_ANSWER, turns[0][1])
        if rng.random() < DETAIL_SHARE:
            turns.insert(rng.randrange(len(turns) + 1), (DETAIL_PROMPT, r["long_captions"][0]))
        conversations = []
        for i, (question, answer) in enumerate(turns):
            conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        samples.append({"id": r["id"], "image": r["image"], "conversations": conversations})
    facts = [(f"How many sides does a {shape} have?", str(sides)) for shape, sides in (("triangle", 3), ("square", 4), ("hexagon", 6))]
    facts += [(f"Which color is {word} a shade of?", color) for color in COLORS for word in EN.colors[color][1:]]
    for k in range(max(1, len(train) // 20)):
        if k % 2 == 0:
            r = rng.choice(train)
            i = rng.randrange(len(r["captions"]))
            question, answer = f"Translate into French: {r['captions'][i]}", r["captions_fr"][i]
        else:
            question, answer = rng.choice(facts)
        samples.append({
            "id": f"text-{k:05d}",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        })
    rng.shuffle(samples)
    return samples


def _qa_lines(records: list[dict]) -> list[str]:
    return [
        json.dumps({"id": f"{r['id']}-q{k}", "image": r["image"], **qa}, ensure_ascii=False)
        for r in records
        for k, qa in enumerate(r["qa"])
    ]


def _corpus(train: list[dict], rng: random.Random) -> list[str]:
    """Train-split sentences in both languages, parallel "English = French" lines, and generic ones."""
    lines = []
    for r in train:
        en, fr = r["captions"], r["captions_fr"]
        picks = rng.sample(range(len(en)), len(en))
        lines += [en[i] for i in picks[:2]] + [fr[i] for i in picks[-2:]]
        lines += [r["long_captions"][0], r["long_caption_fr"]]
        i = rng.randrange(len(en))
        lines.append(f"{en[i]} = {fr[i]}")
    lines += generic_sentences(rng, n_relations=len(train) // 3)
    rng.shuffle(lines)
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _world_files(out_dir: Path) -> list[Path]:
    names = [f"{s}.jsonl" for s in SPLITS] + ["karpathy.json", "corpus.txt", "llava/pretrain.json",
                                              "llava/finetune.json", "llava/qa_val.jsonl", "llava/qa_test.jsonl"]
    return [out_dir / name for name in names]


def _settings(config: SynthConfig) -> dict:
    """The config fields that decide the world's content."""
    settings = config_to_dict(config)
    del settings["out_dir"], settings["overwrite"]
    return settings


def _existing(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def generate_world(config: SynthConfig) -> dict:
    """Write the world under `config.out_dir` and return the summary stored in world.json."""
    _check(config)
    out_dir = Path(config.out_dir)
    settings = _settings(config)
    existing = _existing(out_dir)
    if existing is not None:
        same = existing.get("format_version") == FORMAT_VERSION and existing.get("config") == settings
        if same and all(p.is_file() for p in _world_files(out_dir)):
            print(f"synth: {out_dir} already holds this world (same config); nothing to do")
            return existing
        if not same and not config.overwrite:
            raise InputError(f"{out_dir} holds a world made with another config or generator version "
                             f"(format {existing.get('format_version')}, now {FORMAT_VERSION}); "
                             "choose another out_dir or set overwrite=true")
        (out_dir / "world.json").unlink()
        shutil.rmtree(out_dir / "images", ignore_errors=True)

    records: dict[str, list[dict]] = {}
    for split in SPLITS:
        pictures = sample_split(config, split, getattr(config, f"n_{split}"))
        records[split] = []
        for index, picture in enumerate(tqdm(pictures, desc=f"synth {split}", unit="img", leave=False, disable=None)):
            png, boxes = draw(picture, config.image_size)
            atomic_write_bytes(out_dir / "images" / split / f"{_id(split, index)}.png", png)
            records[split].append(_record(picture, split, index, config, boxes))
        _write_lines(out_dir / f"{split}.jsonl", [json.dumps(r, ensure_ascii=False) for r in records[split]])

    rng = random.Random(f"{config.seed}/formats")
    train = records["train"]
    corpus = _corpus(train, rng)
    atomic_write_json(out_dir / "karpathy.json", _karpathy(records), indent=None)
    atomic_write_json(out_dir / "llava" / "pretrain.json", _llava_pretrain(train, rng), indent=None)
    atomic_write_json(out_dir / "llava" / "finetune.json", _llava_finetune(train, rng), indent=None)
    for split in ("val", "test"):
        _write_lines(out_dir / "llava" / f"qa_{split}.jsonl", _qa_lines(records[split]))
    _write_lines(out_dir / "corpus.txt", corpus)

    long_words = [len(text.split()) for r in train for text in r["long_captions"]]
    summary = {
        "format_version": FORMAT_VERSION,
        "config": settings,
        "counts": {split: len(records[split]) for split in SPLITS},
        "twins": {split: sum(r["twin"] is not None for r in records[split]) for split in SPLITS},
        "mean_long_caption_words": round(sum(long_words) / len(long_words), 1),
        "corpus_lines": len(corpus),
    }
    atomic_write_json(out_dir / "world.json", summary, indent=1)
    counts = ", ".join(f"{split} {n}" for split, n in summary["counts"].items())
    print(f"synth: wrote {out_dir}: {counts} images ({config.image_size} px), "
          f"{sum(summary['twins'].values())} in twin pairs; mean long caption "
          f"{summary['mean_long_caption_words']} words; corpus {len(corpus)} lines")
    return summary
