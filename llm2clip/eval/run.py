"""`llm2clip eval`: LLM2CLIP checkpoints and plain-CLIP baselines side by side.

Tasks: image-text retrieval with the short captions, the long captions and the second-language
(French) short and long captions; zero-shot classification; and CRA (caption retrieval accuracy of
each model's text features, captions 0 against 1). Unreadable images are skipped and counted.
Every metric is reported beside its chance level: what a model that scores everything alike gets.
Writes report.json and report.md under out_dir and prints the table.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from llm2clip.config import config_to_dict
from llm2clip.data.records import ImageText, check_image, load_image_texts
from llm2clip.data.vocabulary import SHAPES
from llm2clip.errors import InputError
from llm2clip.eval.metrics import retrieval_recall, zeroshot_accuracy
from llm2clip.eval.report import write_report
from llm2clip.eval.towers import ImageTextTower, load_tower
from llm2clip.eval.zeroshot import class_embeddings, jsonl_entries, labelled_images, read_classnames, read_templates
from llm2clip.text.cra import bag_of_words_cra, caption_retrieval_accuracy

RETRIEVAL = ("retrieval_short", "retrieval_long", "retrieval_translated", "retrieval_translated_long")
TASKS = (*RETRIEVAL, "zeroshot", "cra")
MAX_LISTED_REASONS = 20


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["runs/stage2/llm2clip/final", "runs/stage2/clip/final"])
    names: list[str] | None = None  # display names (default: the shortest path endings that tell them apart)
    text_encoder: str | None = None  # LLM caption encoder for LLM2CLIP models (default: from their config)
    data: Path = Path("runs/world")  # world directory, JSONL, COCO-Karpathy or ShareGPT4V JSON
    split: str = "test"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    classnames: Path | None = None  # one class name per line (default: the synthetic world's shapes)
    templates: Path | None = None  # prompt templates with "{}", one per line (default: a built-in list)
    zeroshot_data: Path | None = None  # JSONL of {"image", "label"} (default: data; a world labels by shape)
    batch_size: int = 64
    max_images: int | None = None  # first N images of each image list
    device: str | None = None  # default: cuda when available
    out_dir: Path = Path("runs/eval")


@dataclass
class RetrievalSet:
    rows: list[int]  # index of each gallery image in the shared image list
    texts: list[str]
    text_image: list[int]  # gallery position of each text's image


@dataclass
class Plan:
    """What every model is evaluated on: one shared image list and, per task, its part of it."""

    images: list[Path]
    info: dict[str, dict]  # per task: counts, or {"skipped": why}
    retrieval: dict[str, RetrievalSet]
    pairs: list[tuple[str, str]]  # CRA: captions 0 and 1 of each image
    labelled: list[tuple[int, int]]  # zero-shot: (image row, class index)
    classnames: list[str]
    templates: list[str]
    unreadable: list[str]  # why each skipped image could not be used
    skipped_entries: dict[str, int]  # entries of the data file left out, by reason


def _check(config: EvalConfig) -> None:
    if not config.models:
        raise InputError("no models given (models=DIR[,DIR...])")
    unknown = [task for task in config.tasks if task not in TASKS]
    if unknown or not config.tasks:
        raise InputError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    if config.names is not None and len(config.names) != len(config.models):
        raise InputError(f"{len(config.names)} names for {len(config.models)} models; give one name per model")
    if config.batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.max_images is not None and config.max_images < 1:
        raise InputError(f"max_images must be at least 1, got {config.max_images}")


def display_names(config: EvalConfig) -> list[str]:
    if config.names is not None:
        return config.names
    parts = [Path(model).parts for model in config.models]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(config.models)


def _as_texts(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value or []
    return [text.strip() for text in items if isinstance(text, str) and text.strip()]


def _translations(config: EvalConfig) -> dict[Path, dict]:
    """Raw JSONL entries by image path, for the French short/long split that records do not keep."""
    data = config.data
    if (data.is_dir() and (data / "world.json").is_file()) or data.suffix == ".jsonl":
        return {image: entry for image, entry, _ in jsonl_entries(data, config.split)}
    return {}


def _task_texts(task: str, record: ImageText, entry: dict) -> list[str]:
    if task == "retrieval_short":
        return record.captions
    if task == "retrieval_long":
        return record.long_captions
    if task == "retrieval_translated":
        return _as_texts(entry.get("captions_fr"))
    return _as_texts(entry.get("long_caption_fr"))


def _retrieval_set(
    task: str, records: list[ImageText], entries: dict[Path, dict], row: dict[Path, int]
) -> RetrievalSet:
    rows, texts, text_image = [], [], []
    for record in records:
        captions = _task_texts(task, record, entries.get(record.image, {}))
        if captions:
            texts += captions
            text_image += [len(rows)] * len(captions)
            rows.append(row[record.image])
    return RetrievalSet(rows, texts, text_image)


def _encode_texts(tower: ImageTextTower, texts: list[str], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Features of `texts`, each distinct text encoded once per model."""
    new = [text for text in dict.fromkeys(texts) if text not in cache]
    if new:
        cache.update(zip(new, tower.text_features(new)))
    return torch.stack([cache[text] for text in texts])


def _encode_images(tower: ImageTextTower, paths: list[Path], batch_size: int) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", disable=None):
        batch = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                batch.append(image.convert("RGB"))
        chunks.append(tower.image_features(batch))
    return torch.cat(chunks)


def build_plan(config: EvalConfig) -> Plan:
    """Load the data of every task, skipping unreadable images (each checked once)."""
    tasks = list(dict.fromkeys(config.tasks))
    reasons: dict[Path, str | None] = {}

    def readable(path: Path) -> bool:
        if path not in reasons:
            reasons[path] = check_image(path)
        return reasons[path] is None

    records: list[ImageText] = []
    skipped_entries: Counter[str] = Counter()
    if any(task != "zeroshot" for task in tasks):
        records = [r for r in load_image_texts(config.data, config.split, skipped=skipped_entries)[: config.max_images]
                   if readable(r.image)]
    labelled, classnames, templates = [], [], []
    if "zeroshot" in tasks:
        classnames = read_classnames(config.classnames) if config.classnames else list(SHAPES)
        templates = read_templates(config.templates)
        pairs = labelled_images(config.zeroshot_data or config.data, config.split, classnames)
        labelled = [(image, label) for image, label in pairs[: config.max_images] if readable(image)]

    images = list(dict.fromkeys([r.image for r in records] + [image for image, _ in labelled]))
    row = {image: i for i, image in enumerate(images)}
    entries = _translations(config) if {"retrieval_translated", "retrieval_translated_long"} & set(tasks) else {}
    retrieval = {task: _retrieval_set(task, records, entries, row) for task in tasks if task in RETRIEVAL}
    pairs_ab = [(r.captions[0], r.captions[1]) for r in records if len(r.captions) >= 2]
    info = {}
    for task in tasks:
        if task in RETRIEVAL:
            chosen = retrieval[task]
            info[task] = {"images": len(chosen.rows), "texts": len(chosen.texts)} if chosen.texts else {
                "skipped": "no readable image has such captions in this data"}
        elif task == "cra":
            info[task] = {"pairs": len(pairs_ab)} if len(pairs_ab) >= 2 else {
                "skipped": "fewer than 2 readable images with 2 captions"}
        else:
            info[task] = {"images": len(labelled), "classes": len(classnames)} if labelled else {
                "skipped": "no readable labelled image"}
    return Plan(images, info, retrieval, pairs_ab, [(row[image], label) for image, label in labelled], classnames,
                templates, [reason for reason in reasons.values() if reason is not None], dict(skipped_entries))


def evaluate_tower(tower: ImageTextTower, plan: Plan, batch_size: int) -> dict[str, dict[str, float]]:
    """Metrics (fractions) of one model on every task of the plan that is not skipped."""
    image_features = _encode_images(tower, plan.images, batch_size) if plan.images else torch.empty(0)
    cache: dict[str, torch.Tensor] = {}
    metrics = {}
    for task, info in plan.info.items():
        if "skipped" in info:
            continue
        if task in RETRIEVAL:
            chosen = plan.retrieval[task]
            scores = image_features[chosen.rows] @ _encode_texts(tower, chosen.texts, cache).T
            metrics[task] = retrieval_recall(scores, torch.tensor(chosen.text_image))
        elif task == "cra":
            a = _encode_texts(tower, [a for a, _ in plan.pairs], cache)
            b = _encode_texts(tower, [b for _, b in plan.pairs], cache)
            metrics[task] = {"cra": caption_retrieval_accuracy(a, b)}
        else:
            weights = class_embeddings(tower, plan.classnames, plan.templates)
            logits = image_features[[image for image, _ in plan.labelled]] @ weights.T
            metrics[task] = zeroshot_accuracy(logits, torch.tensor([label for _, label in plan.labelled]))
    return metrics


def chance_metrics(plan: Plan) -> dict[str, dict[str, float]]:
    """The chance level of every metric: the score of a model whose similarities all tie (ties
    count fractionally), e.g. 1/classes for zero-shot top-1 and about 1/images for retrieval R@1."""
    metrics = {}
    for task, info in plan.info.items():
        if "skipped" in info:
            continue
        if task in RETRIEVAL:
            chosen = plan.retrieval[task]
            metrics[task] = retrieval_recall(torch.zeros(len(chosen.rows), len(chosen.texts)), torch.tensor(chosen.text_image))
        elif task == "cra":
            same = torch.ones(len(plan.pairs), 1)
            metrics[task] = {"cra": caption_retrieval_accuracy(same, same)}
        else:
            labels = torch.tensor([label for _, label in plan.labelled])
            metrics[task] = zeroshot_accuracy(torch.zeros(len(labels), len(plan.classnames)), labels)
    return metrics


def evaluate(config: EvalConfig) -> dict:
    """Evaluate every model on every task; write report.json and report.md; return the report."""
    _check(config)
    work = build_plan(config)
    report = {
        "data": str(config.data),
        "split": config.split,
        "tasks": work.info,
        "skipped_images": {"count": len(work.unreadable), "reasons": work.unreadable[:MAX_LISTED_REASONS]},
        "skipped_entries": work.skipped_entries,
        "models": [],
        "chance": chance_metrics(work),
        "config": config_to_dict(config),
    }
    if "pairs" in work.info.get("cra", {}):
        report["cra_bag_of_words"] = bag_of_words_cra([a for a, _ in work.pairs], [b for _, b in work.pairs])
    for name, model_dir in zip(display_names(config), config.models):
        tower = load_tower(model_dir, config.text_encoder, config.batch_size, config.device)
        metrics = evaluate_tower(tower, work, config.batch_size)
        report["models"].append({"name": name, "path": str(model_dir), "type": tower.kind, "metrics": metrics})
        del tower  # one model in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(write_report(report, config.out_dir), end="")
    print(f"eval: wrote {config.out_dir / 'report.json'} and {config.out_dir / 'report.md'}")
    return report
