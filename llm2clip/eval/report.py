"""The evaluation report: report.json (every metric, as fractions) and report.md (one table, in %,
with a last row for the chance level of each metric)."""

from __future__ import annotations

import os
from pathlib import Path

from llm2clip.data.records import describe_counts
from llm2clip.fileio import atomic_write_json, atomic_write_text

# Table columns per task: (metric key in report.json, column header). The JSON has R@5 and R@10 too.
COLUMNS = {
    "retrieval_short": [("i2t R@1", "short i2t R@1"), ("t2i R@1", "short t2i R@1")],
    "retrieval_long": [("i2t R@1", "long i2t R@1"), ("t2i R@1", "long t2i R@1")],
    "retrieval_translated": [("i2t R@1", "translated i2t R@1"), ("t2i R@1", "translated t2i R@1")],
    "retrieval_translated_long": [("i2t R@1", "translated long i2t R@1"), ("t2i R@1", "translated long t2i R@1")],
    "zeroshot": [("top-1", "zero-shot top-1"), ("top-5", "zero-shot top-5")],
    "cra": [("cra", "CRA")],
}


def markdown(report: dict) -> str:
    """A header line, a row per model with a column per metric (in %), and the notes."""
    tasks = [task for task in report["tasks"] if "skipped" not in report["tasks"][task]]
    columns = [(task, key, header) for task in tasks for key, header in COLUMNS[task]]
    lines = [
        f"Evaluation on {report['data']} ({report['split']}), numbers in %.",
        "",
        "| model | " + " | ".join(header for _, _, header in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    rows = [(model["name"], model["metrics"]) for model in report["models"]] + [("chance", report["chance"])]
    for name, metrics in rows:
        cells = [f"{100 * metrics[task][key]:.1f}" for task, key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for task, info in report["tasks"].items():
        if "skipped" in info:
            lines.append(f"- {task}: skipped ({info['skipped']})")
        else:
            counts = ", ".join(f"{n} {what}" for what, n in info.items())
            lines.append(f"- {task}: {counts}")
    if "cra_bag_of_words" in report:
        lines.append(f"- CRA of a bag of words on the same captions: {100 * report['cra_bag_of_words']:.1f}")
    skipped = report["skipped_images"]
    if skipped["count"]:
        lines.append(f"- skipped {skipped['count']} unreadable image(s), e.g. {skipped['reasons'][0]}")
    if report.get("skipped_entries"):
        entries = describe_counts(report["skipped_entries"])
        lines.append(f"- left out entries of the data: {entries}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike) -> str:
    """Write report.json and report.md under `out_dir` (each atomically) and return the markdown."""
    out_dir = Path(out_dir)
    table = markdown(report)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", table)
    return table
