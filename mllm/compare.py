"""`mllm compare`: several `mllm eval` reports of the same models trained with different seeds, side by side.

Each report.json is one run (for instance scripts/train_llava.sh with one tower and one seed); its
first model's scores are that run's, and `groups` names the setup each report belongs to (a tower).
Per group and column the table gives the mean, the standard deviation over the runs and the range;
the no-image majority-answer row comes from the reports' reference, which must be the same in all.
Writes out_dir/compare.json and out_dir/compare.md.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json, atomic_write_text


@dataclass
class CompareConfig:
    reports: list[str] = field(default_factory=list)  # report.json files written by `mllm eval`
    groups: list[str] = field(default_factory=list)  # one name per report: the setup it belongs to
    out_dir: Path = Path("runs/llava-compare")


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"no report at {path}; run `mllm eval` (or scripts/train_llava.sh) first")
    report = json.loads(path.read_text(encoding="utf-8"))
    if not report.get("models"):
        raise InputError(f"{path} holds no model scores")
    return report


def summarize(scores: list[float]) -> dict:
    return {"mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores), "max": max(scores), "runs": len(scores)}


def compare(config: CompareConfig) -> dict:
    if not config.reports or len(config.reports) != len(config.groups):
        raise InputError(f"give one group name per report: {len(config.reports)} reports, "
                         f"{len(config.groups)} groups")
    reports = [read_report(Path(path)) for path in config.reports]
    references = {json.dumps(r.get("reference"), sort_keys=True) for r in reports}
    if len(references) > 1:
        raise InputError("the reports have different no-image reference rows: they were scored on other questions")
    columns = reports[0]["columns"]
    by_group: dict[str, list[dict]] = {}
    for group, report in zip(config.groups, reports):
        if report["columns"] != columns:
            raise InputError(f"the reports have different columns: {columns} against {report['columns']}")
        by_group.setdefault(group, []).append(report["models"][0]["scores"])
    table = {
        group: {column: summarize([run[column] for run in runs])
                for column in columns if all(column in run for run in runs)}
        for group, runs in by_group.items()
    }
    result = {"columns": columns, "groups": table, "reference": reports[0].get("reference"),
              "reports": dict(zip(config.reports, config.groups))}
    out = Path(config.out_dir)
    atomic_write_json(out / "compare.json", result)
    text = markdown(result)
    atomic_write_text(out / "compare.md", text)
    print(text)
    print(f"mllm compare: wrote {out / 'compare.md'} and {out / 'compare.json'}")
    return result


def markdown(result: dict) -> str:
    columns = result["columns"]
    runs = sorted({s["runs"] for cells in result["groups"].values() for s in cells.values()})
    lines = [
        "# LLaVA across seeds",
        "",
        f"Mean ± standard deviation over {'/'.join(map(str, runs))} runs per row, the range below it.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for group, cells in result["groups"].items():
        lines.append(f"| {group} | " + " | ".join(
            f"{cells[c]['mean']:.3f} ± {cells[c]['std']:.3f}" if c in cells else "-" for c in columns) + " |")
        lines.append("| (range) | " + " | ".join(
            f"{cells[c]['min']:.3f}–{cells[c]['max']:.3f}" if c in cells else "-" for c in columns) + " |")
    reference = result.get("reference")
    if reference:
        lines.append(f"| _{reference['name']}_ | " + " | ".join(
            f"{reference['scores'][c]:.3f}" if c in reference["scores"] else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"
