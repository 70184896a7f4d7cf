"""The report's PNG figures (matplotlib): loss curves, retrieval bars, LLaVA bars and retrieval examples."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the file backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from llm2clip.demo.config import DemoConfig  # noqa: E402
from llm2clip.demo.report import DIRECTIONS, EVAL_NAMES, FLOOR_NAME, RETRIEVAL_TASKS, TOWERS, _category  # noqa: E402
from llm2clip.demo.steps import Paths  # noqa: E402

COLORS = {"llm2clip": "tab:blue", "clip": "tab:orange"}
SHORT_TASKS = {"retrieval_short": "short", "retrieval_long": "long", "retrieval_translated": "FR short",
               "retrieval_translated_long": "FR long"}


def _newest_trainer_state(checkpoints: Path) -> dict | None:
    numbered = sorted((int(m[1]), p) for p in checkpoints.glob("checkpoint-*")
                      if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file())
    return json.loads((numbered[-1][1] / "trainer_state.json").read_text()) if numbered else None


def loss_curve(report_path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a step's report, else from its newest checkpoint's trainer_state.json."""
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    points = [(e["step"], e["loss"]) for e in report.get("loss_curve", [])]
    if not points:
        state = _newest_trainer_state(report_path.parent / "checkpoints") or {}
        points = [(e["step"], e["loss"]) for e in state.get("log_history", []) if "loss" in e]
    return points


def loss_sources(paths: Paths) -> dict[str, Path]:
    sources = {
        "tiny LLM (pretraining)": paths.llm / "training_report.json",
        "stage 1a: MNTP": paths.mntp / "mntp_report.json",
        "stage 1b: caption contrastive": paths.contrastive / "contrastive_report.json",
    }
    sources.update({f"stage 2: {EVAL_NAMES[t]}": paths.stage2(t) / "train_report.json" for t in TOWERS})
    for t in TOWERS:
        for stage in ("pretrain", "finetune"):
            sources[f"LLaVA + {EVAL_NAMES[t]} tower: {stage}"] = paths.llava(t) / stage / "train_report.json"
    return sources


def draw_loss_curves(paths: Paths, out: Path) -> Path:
    sources = loss_sources(paths)
    cols = 3
    rows = -(-len(sources) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, path) in zip(axes.flat, sources.items()):
        points = loss_curve(path)
        ax.set_title(title, fontsize=11)
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="." if len(points) < 30 else None, color="tab:blue")
            if len(points) == 1:
                ax.set_xticks(steps)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step" if len(points) > 1 else "step (one logged point)")
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.suptitle("Training loss of every trained stage (one seed)", fontsize=14)
    return _save(fig, out / "loss_curves.png")


def draw_retrieval(report: dict, out: Path) -> Path:
    ev = report["eval"]
    groups = [(task, d) for task in RETRIEVAL_TASKS for d in DIRECTIONS]
    labels = [f"{SHORT_TASKS[task]}\n{DIRECTIONS[d]}" for task, d in groups]
    x = np.arange(len(groups))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), sharey=False)
    for ax, recall in zip(axes, ("R@1", "R@5", "R@10")):
        width = 0.38
        for offset, tower in zip((-width / 2, width / 2), TOWERS):
            values = [ev["towers"][tower]["retrieval"][task][f"{d} {recall}"] for task, d in groups]
            ax.bar(x + offset, [100 * (v or 0) for v in values], width, label=EVAL_NAMES[tower], color=COLORS[tower])
        chance = [ev["chance"]["retrieval"][task][f"{d} {recall}"] for task, d in groups]
        ax.hlines([100 * (c or 0) for c in chance], x - 0.45, x + 0.45, colors="black", linestyles="--",
                  label="chance")
        ax.set_xticks(x, labels, fontsize=9)
        ax.set_ylabel(f"{recall} (%)")
        ax.set_title(f"Image↔text retrieval {recall}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle("Stage 2 on the test images: LLM2CLIP against the CLIP baseline (one seed)", fontsize=13)
    return _save(fig, out / "retrieval.png")


def draw_llava(report: dict, out: Path) -> Path | None:
    llava = report["llava"]
    columns = llava["columns"]
    if not columns:
        return None
    x = np.arange(len(columns))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(columns)), 4.5))
    for offset, (name, scores), tower in zip((-width / 2, width / 2), llava["rows"].items(), TOWERS):
        ax.bar(x + offset, [scores.get(c) or 0 for c in columns], width, label=name, color=COLORS[tower])
    ax.hlines([llava["floor"].get(c) or 0 for c in columns], x - 0.45, x + 0.45, colors="black", linestyles="--",
              label=FLOOR_NAME)
    ax.set_xticks(x, [_category(c) for c in columns])
    ax.set_ylim(0, 1)
    ax.set_xlabel("question category")
    ax.set_ylabel("exact match")
    ax.set_title("LLaVA-1.5 per question category, against the no-image floor (one seed)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out / "llava.png")


def _wrapped(text: str, width: int = 72, limit: int = 260) -> str:
    text = text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " …"
    return textwrap.fill(text, width)


def draw_examples(examples: list[dict], out: Path) -> Path | None:
    if not examples:
        return None
    fig, axes = plt.subplots(len(examples), 1 + len(TOWERS), figsize=(20, 4.2 * len(examples)),
                             gridspec_kw={"width_ratios": [1, 2.4, 2.4]}, squeeze=False)
    for row, example in zip(axes, examples):
        with Image.open(example["image"]) as image:
            row[0].imshow(image.convert("RGB"), interpolation="nearest")
        row[0].set_title(Path(example["image"]).name, fontsize=10)
        row[0].axis("off")
        for ax, tower in zip(row[1:], TOWERS):
            ax.axis("off")
            ax.set_title(f"{EVAL_NAMES[tower]}: top {len(example['top'][tower])} long captions", fontsize=11)
            y = 0.98
            for rank, hit in enumerate(example["top"][tower], 1):
                mark, color = ("✓ right image", "tab:green") if hit["correct"] else ("✗ other image", "tab:red")
                text = _wrapped(f"{rank}. [{mark}] {hit['caption']}")
                ax.text(0.0, y, text, va="top", ha="left", fontsize=10.5, color=color, transform=ax.transAxes,
                        linespacing=1.25)
                y -= 0.1 + 0.058 * (text.count("\n") + 1)
    fig.suptitle("Retrieval examples: each tower's top long captions for a test image "
                 "(green ✓: a caption of that image; red ✗: another image's)", fontsize=14)
    return _save(fig, out / "examples.png", top=0.965)


def _save(fig, path: Path, top: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def draw_figures(config: DemoConfig, report: dict) -> list[Path]:
    """Every figure whose data exists, written under out_dir/figures; returns their paths."""
    from llm2clip.demo.examples import retrieval_examples

    paths = Paths(config)
    out = paths.figures
    drawn = [draw_loss_curves(paths, out), draw_retrieval(report, out), draw_llava(report, out)]
    if config.examples > 0 and all((paths.stage2(t) / "final" / "config.json").is_file() for t in TOWERS):
        gallery = report["eval"]["queries"]["retrieval_long"]["i2t"]
        examples = retrieval_examples(paths, config.examples, int(gallery) if gallery else None)
        report["examples"] = examples
        drawn.append(draw_examples(examples, out))
    return [p for p in drawn if p is not None]
