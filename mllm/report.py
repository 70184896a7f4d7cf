"""The LLaVA benchmark report: report.json and report.md, one row per model and one column per task.

Scores come from lmms-eval's own results files. A task with one metric gets one column named after
the task; a task with several (MME, POPE) gets one column per metric, named "task metric".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llm2clip.fileio import atomic_write_json, atomic_write_text


@dataclass
class ModelRun:
    name: str
    path: str  # the exported Llava directory as given
    command: str  # the exact shell command that ran lmms-eval
    results: dict  # lmms-eval's results JSON


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task, its numeric metrics from an lmms-eval results JSON (stderr entries left out).

    lmms-eval keys metrics as "metric,filter"; the default filter "none" is dropped from the name.
    """
    table = {}
    for task, values in results["results"].items():
        table[task] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            table[task][metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = float(value)
    return table


def build_report(runs: list[ModelRun], lmms_eval_version: str, settings: dict, reference: dict | None = None) -> dict:
    """The report as plain data: settings, columns in first-seen order, a row per model, and an optional
    reference row (`name`, `scores` by column) such as the no-image majority answer."""
    per_model = [metrics(run.results) for run in runs]
    task_metrics: dict[str, list[str]] = {}
    for table in per_model:
        for task, values in table.items():
            names = task_metrics.setdefault(task, [])
            names.extend(m for m in values if m not in names)
    columns = {
        (task if len(names) == 1 else f"{task} {metric}"): (task, metric)
        for task, names in task_metrics.items()
        for metric in names
    }
    models = []
    for run, table in zip(runs, per_model):
        scores = {col: table[task][metric] for col, (task, metric) in columns.items() if metric in table.get(task, {})}
        samples = {task: n["effective"] for task, n in run.results.get("n-samples", {}).items()}
        models.append({"name": run.name, "path": run.path, "scores": scores, "samples": samples,
                       "command": run.command})
    return {"lmms_eval_version": lmms_eval_version, **settings, "columns": list(columns), "models": models,
            "reference": reference}


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) <= 1 else f"{value:.1f}"


def markdown(report: dict) -> str:
    columns = report["columns"]
    limit = report.get("limit")
    lines = [
        "# LLaVA benchmark",
        "",
        f"lmms-eval {report['lmms_eval_version']}, model `{report['lmms_eval_model']}`, batch size 1, "
        f"{'first ' + str(limit) + ' samples of each task' if limit else 'all samples'}.",
    ]
    if report.get("world"):
        lines.append(f"synth_qa: the {report['split']} questions of the synthetic world {report['world']}.")
    lines += [
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model in report["models"]:
        lines.append(f"| {model['name']} | " + " | ".join(_cell(model["scores"].get(c)) for c in columns) + " |")
    reference = report.get("reference")
    if reference:
        lines.append(f"| _{reference['name']}_ | " + " | ".join(_cell(reference["scores"].get(c)) for c in columns) + " |")
    lines.append("")
    for model in report["models"]:
        counts = ", ".join(f"{task} {n}" for task, n in model["samples"].items())
        lines.append(f"- {model['name']} ({model['path']}): samples per task: {counts}")
    lines += ["", "## Commands", ""]
    for model in report["models"]:
        lines += [f"{model['name']}:", "", "```sh", model["command"], "```", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | os.PathLike) -> str:
    """Write report.json and report.md under `out_dir` (each atomically) and return the markdown."""
    out_dir = Path(out_dir)
    text = markdown(report)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", text)
    return text
