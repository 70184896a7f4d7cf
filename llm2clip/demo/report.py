"""The demo's report (report.json, report.md, figures/) built from the JSON files the steps wrote.

A file that is not there gives "not measured" (null in report.json) for what it holds; a value that is there
but is not a finite number is an error naming the file and key. Every number of the demo is from one seed.
"""

from __future__ import annotations

import json
import math
import os
import platform
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from transformers.utils import logging as transformers_logging

from llm2clip.demo.config import DemoConfig, Targets
from llm2clip.demo.steps import CRA_KINDS, EVAL_NAMES, TOWERS, Paths, Step
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json, atomic_write_text

NOT_MEASURED = "not measured"
CRA_LABELS = ("LLM before stage 1", "after MNTP", "after MNTP + caption contrastive")
CRA_COLUMNS = {"short": "short", "long": "long", "translated": "EN→FR short", "translated_long": "EN→FR long"}
RETRIEVAL_TASKS = {"retrieval_short": "short captions", "retrieval_long": "long captions",
                   "retrieval_translated": "French short captions", "retrieval_translated_long": "French long captions"}
RECALLS = ("R@1", "R@5", "R@10")
DIRECTIONS = {"i2t": "I2T", "t2i": "T2I"}
TOWER_NAMES = {tower: f"LLaVA + {EVAL_NAMES[tower]} tower" for tower in TOWERS}
FLOOR_NAME = "no image (majority answer)"


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when the file is not there."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from err


def number(data: dict | None, *keys: str, where: str) -> float | None:
    """data[k0][k1]...: a finite float, None when absent; anything else there is an error."""
    value = data
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: {'.'.join(keys)} is {value!r}, not a finite number")
    return float(value)


def _standard_error(p: float, n: int | None) -> float:
    """One standard error of a rate p measured on n queries (a zero rate counts as one hit in n)."""
    if not n:
        return 0.0
    p = max(p, 1.0 / n)
    return math.sqrt(p * (1.0 - p) / n)


def _pct(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.1f}%"


def _claim(claim_id: str, text: str, target: str, measured: str, floor: str, passed: bool | None) -> dict:
    result = "NOT MEASURED" if passed is None else ("PASS" if passed else "FAIL")
    return {"id": claim_id, "claim": text, "target": target, "measured": measured, "floor": floor, "result": result}


def collect_cra(paths: Paths) -> dict:
    """Per kind: images, chance, bag of words and each encoder's CRA (None when not measured)."""
    labels = dict(zip(map(str, paths.cra_models()), CRA_LABELS))
    kinds = {}
    for kind in CRA_KINDS:
        path = paths.cra(kind)
        data = read_json(path)
        where = str(path)
        rows = {label: None for label in CRA_LABELS}
        if data is not None:
            for model, label in labels.items():
                rows[label] = number(data, "cra", model, where=where)
        kinds[kind] = {"images": number(data, "images", where=where), "chance": number(data, "chance", where=where),
                       "bag of words": number(data, "cra", "bag of words", where=where), "encoders": rows}
    return kinds


def collect_eval(paths: Paths) -> dict:
    """Retrieval, zero-shot and caption↔caption R@1 in the joint space per tower, with chance and query counts."""
    path = paths.eval / "report.json"
    data = read_json(path)
    where = str(path)
    by_name = {m.get("name"): m for m in (data or {}).get("models", [])}
    towers = {}
    for tower in TOWERS:
        metrics = by_name.get(EVAL_NAMES[tower], {}).get("metrics")
        towers[tower] = {
            "retrieval": {task: {f"{d} {r}": number(metrics, task, f"{d} {r}", where=where)
                                 for d in DIRECTIONS for r in RECALLS} for task in RETRIEVAL_TASKS},
            "zeroshot": {k: number(metrics, "zeroshot", k, where=where) for k in ("top-1", "top-5")},
            "joint_caption_r1": number(metrics, "cra", "cra", where=where),
        }
    chance = {
        "retrieval": {task: {f"{d} {r}": number(data, "chance", task, f"{d} {r}", where=where)
                             for d in DIRECTIONS for r in RECALLS} for task in RETRIEVAL_TASKS},
        "zeroshot": {k: number(data, "chance", "zeroshot", k, where=where) for k in ("top-1", "top-5")},
        "joint_caption_r1": number(data, "chance", "cra", "cra", where=where),
    }
    queries = {task: {"i2t": number(data, "tasks", task, "images", where=where),
                      "t2i": number(data, "tasks", task, "texts", where=where)} for task in RETRIEVAL_TASKS}
    return {"towers": towers, "chance": chance, "queries": queries}


def collect_llava(paths: Paths) -> dict:
    """The mllm eval report per QA category, with the no-image floor and the samples each model answered."""
    path = paths.llava_eval / "report.json"
    data = read_json(path)
    where = str(path)
    columns = list((data or {}).get("columns", []))
    by_name = {m.get("name"): m for m in (data or {}).get("models", [])}
    rows, samples = {}, {}
    for tower in TOWERS:
        model = by_name.get(tower, {})
        rows[TOWER_NAMES[tower]] = {c: number(model, "scores", c, where=where) for c in columns}
        counts = [n for task, n in model.get("samples", {}).items() if task != "synth_qa"]
        samples[TOWER_NAMES[tower]] = sum(counts) if counts else None
    reference = (data or {}).get("reference") or {}
    floor = {c: number(reference, "scores", c, where=where) for c in columns}
    return {"columns": columns, "rows": rows, "floor": floor, "samples": samples}


def _category(column: str) -> str:
    return "all" if column == "synth_qa" else column.removeprefix("synth_qa_")


def build_claims(cra: dict, ev: dict, llava: dict, targets: Targets) -> list[dict]:
    z = targets.noise_z
    claims = []
    for kind in ("short", "long"):
        row = cra[kind]
        before, after = row["encoders"][CRA_LABELS[0]], row["encoders"][CRA_LABELS[-1]]
        n = int(row["images"]) if row["images"] else None
        passed = None
        if before is not None and after is not None:
            passed = 100 * (after - before) >= targets.cra_gain_points and after > before + z * _standard_error(before, n)
        measured = NOT_MEASURED if passed is None else f"{100 * (after - before):+.1f} points ({_pct(before)} → {_pct(after)})"
        claims.append(_claim(f"a-{kind}", f"CRA gain after stage 1, {kind} captions",
                             f"≥ +{targets.cra_gain_points:g} points", measured,
                             f"before {_pct(before)}; chance {_pct(row['chance'])}", passed))
    towers, chance, queries = ev["towers"], ev["chance"], ev["queries"]

    def r1(tower: str, task: str, direction: str) -> float | None:
        return towers[tower]["retrieval"][task][f"{direction} R@1"]

    for direction, label in DIRECTIONS.items():
        n = queries["retrieval_long"][direction]
        ours, theirs = r1("llm2clip", "retrieval_long", direction), r1("clip", "retrieval_long", direction)
        passed = None
        if ours is not None and theirs is not None:
            passed = (100 * (ours - theirs) >= targets.long_r1_margin_points
                      and ours > theirs + z * _standard_error(theirs, int(n) if n else None))
        claims.append(_claim(
            f"b-{direction}", f"long-caption R@1 {label}: LLM2CLIP over CLIP", f"≥ CLIP + {targets.long_r1_margin_points:g} points",
            NOT_MEASURED if passed is None else f"LLM2CLIP {_pct(ours)}, CLIP {_pct(theirs)} ({100 * (ours - theirs):+.1f} points)",
            f"CLIP {_pct(theirs)}; chance {_pct(chance['retrieval']['retrieval_long'][f'{direction} R@1'])}", passed))
    for direction, label in DIRECTIONS.items():
        n = queries["retrieval_short"][direction]
        ours, theirs = r1("llm2clip", "retrieval_short", direction), r1("clip", "retrieval_short", direction)
        floor = chance["retrieval"]["retrieval_short"][f"{direction} R@1"]
        passed = None
        if ours is not None and theirs is not None and floor is not None:
            passed = (ours >= theirs and ours >= targets.short_r1_min
                      and ours > floor + z * _standard_error(floor, int(n) if n else None))
        times = f" ({targets.short_r1_min / floor:.0f}× chance)" if floor else ""
        claims.append(_claim(
            f"c-{direction}", f"short-caption R@1 {label}: LLM2CLIP at least CLIP", f"≥ CLIP and ≥ {_pct(targets.short_r1_min)}{times}",
            NOT_MEASURED if passed is None else f"LLM2CLIP {_pct(ours)}, CLIP {_pct(theirs)}", f"chance {_pct(floor)}", passed))
    for direction, label in DIRECTIONS.items():
        n = queries["retrieval_translated"][direction]
        ours, theirs = r1("llm2clip", "retrieval_translated", direction), r1("clip", "retrieval_translated", direction)
        floor = chance["retrieval"]["retrieval_translated"][f"{direction} R@1"]
        passed = None
        if ours is not None and floor is not None:
            passed = (ours >= targets.french_r1_chance_multiple * floor
                      and ours > floor + z * _standard_error(floor, int(n) if n else None))
        claims.append(_claim(
            f"d-{direction}", f"French short-caption R@1 {label} of LLM2CLIP (trained on English only)",
            f"≥ {targets.french_r1_chance_multiple:g}× chance" + (f" ({_pct(targets.french_r1_chance_multiple * floor)})" if floor else ""),
            NOT_MEASURED if passed is None else f"LLM2CLIP {_pct(ours)} (CLIP {_pct(theirs)})", f"chance {_pct(floor)}", passed))
    ours, theirs = (llava["rows"][TOWER_NAMES[t]].get("synth_qa") for t in TOWERS)
    floor = llava["floor"].get("synth_qa")
    n = llava["samples"][TOWER_NAMES["llm2clip"]]
    passed = None
    if ours is not None and theirs is not None and floor is not None:
        passed = 100 * (ours - theirs) >= targets.llava_margin_points and ours > floor + z * _standard_error(floor, n)
    claims.append(_claim(
        "e", "LLaVA exact match, all questions: LLM2CLIP tower against CLIP tower and the no-image floor",
        f"above the floor and ≥ CLIP tower {targets.llava_margin_points:+g} points",
        NOT_MEASURED if passed is None else f"LLM2CLIP tower {ours:.3f}, CLIP tower {theirs:.3f}",
        "no image " + ("-" if floor is None else f"{floor:.3f}"), passed))
    return claims


def environment() -> dict:
    import torch
    import transformers

    from llm2clip.demo.runner import child_env

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY (steps)": child_env()["OMP_WAIT_POLICY"],
        "OMP_NUM_THREADS (steps)": child_env().get("OMP_NUM_THREADS", "unset"),
        "platform": platform.platform(),
        "load average (1, 5, 15 min) at the report": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def step_times(steps: list[Step], state: dict, reused: set[str]) -> list[dict]:
    rows = []
    for step in steps:
        record = state["steps"].get(step.key, {})
        if not record:
            status = "not run"
        else:
            status = "given" if record.get("given") else ("reused" if step.key in reused else "ran")
        rows.append({"key": step.key, "title": step.title, "seconds": record.get("seconds"), "status": status,
                     "load_1min": record.get("load_1min")})
    return rows


def build_report(config: DemoConfig, steps: list[Step], state: dict, reused: set[str]) -> dict:
    """Everything the report says, as plain data (figures are added by write_report)."""
    paths = Paths(config)
    cra, ev, llava = collect_cra(paths), collect_eval(paths), collect_llava(paths)
    times = step_times(steps, state, reused)
    return {
        "profile": config.profile,
        "seeds": "one seed (each command's default seed); no spread is measured",
        "claims": build_claims(cra, ev, llava, config.targets),
        "cra": cra,
        "eval": ev,
        "llava": llava,
        "environment": environment(),
        "steps": times,
        "total_seconds": round(sum(t["seconds"] or 0.0 for t in times), 1),
        "figures": [],
    }


def _cell(value: float | None, percent: bool = True) -> str:
    if value is None:
        return NOT_MEASURED
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def markdown(report: dict) -> str:
    from llm2clip.demo.runner import format_seconds

    lines = ["# LLM2CLIP demo report", "",
             f"Profile `{report['profile']}`. Every number below is from {report['seeds']}."
             + (" The quick profile checks the pipeline end to end at a tiny budget: its numbers say nothing about "
                "the claims." if report["profile"] == "quick" else ""), "",
             "## Claims", "",
             "A claim passes when it meets its target and lies more than the configured number of standard errors "
             "above its floor.", "",
             "| claim | target | measured | floor / chance | result |", "|---|---|---|---|---|"]
    lines += [f"| {c['id']}: {c['claim']} | {c['target']} | {c['measured']} | {c['floor']} | **{c['result']}** |"
              for c in report["claims"]]

    cra = report["cra"]
    lines += ["", "## Stage 1: caption retrieval accuracy (CRA, %)", "",
              "Each caption retrieves its partner among the test images' captions, by the encoder's embeddings.", "",
              "| encoder | " + " | ".join(CRA_COLUMNS.values()) + " |", "|---|" + "---:|" * len(CRA_COLUMNS)]
    for label in CRA_LABELS:
        lines.append(f"| {label} | " + " | ".join(_cell(cra[k]["encoders"][label]) for k in CRA_COLUMNS) + " |")
    lines.append("| _bag of words_ | " + " | ".join(_cell(cra[k]["bag of words"]) for k in CRA_COLUMNS) + " |")
    lines.append("| _chance_ | " + " | ".join(_cell(cra[k]["chance"]) for k in CRA_COLUMNS) + " |")

    ev = report["eval"]
    lines += ["", "## Stage 2: image↔text retrieval (%)", ""]
    header = [f"{DIRECTIONS[d]} {r}" for d in DIRECTIONS for r in RECALLS]
    for task, title in RETRIEVAL_TASKS.items():
        q = ev["queries"][task]
        counts = "" if q["i2t"] is None else f" ({q['i2t']:.0f} images, {q['t2i']:.0f} texts)"
        lines += [f"**{title}**{counts}", "", "| tower | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
        for tower in TOWERS:
            values = ev["towers"][tower]["retrieval"][task]
            lines.append(f"| {EVAL_NAMES[tower]} | " + " | ".join(_cell(values[f'{d} {r}']) for d in DIRECTIONS for r in RECALLS) + " |")
        chance = ev["chance"]["retrieval"][task]
        lines += ["| _chance_ | " + " | ".join(_cell(chance[f'{d} {r}']) for d in DIRECTIONS for r in RECALLS) + " |", ""]
    lines += ["**zero-shot classification** (main object's shape)", "", "| tower | top-1 | top-5 |", "|---|---:|---:|"]
    for tower in TOWERS:
        z = ev["towers"][tower]["zeroshot"]
        lines.append(f"| {EVAL_NAMES[tower]} | {_cell(z['top-1'])} | {_cell(z['top-5'])} |")
    lines += [f"| _chance_ | {_cell(ev['chance']['zeroshot']['top-1'])} | {_cell(ev['chance']['zeroshot']['top-5'])} |", "",
              "Caption↔caption R@1 in the joint space (each tower's text side, two short captions of one image): "
              + ", ".join(f"{EVAL_NAMES[t]} {_cell(ev['towers'][t]['joint_caption_r1'])}" for t in TOWERS)
              + f", chance {_cell(ev['chance']['joint_caption_r1'])} (%)."]

    llava = report["llava"]
    columns = llava["columns"]
    lines += ["", "## LLaVA-1.5 on each tower (exact match on the held-out questions)", ""]
    if not columns:
        lines.append(f"LLaVA: {NOT_MEASURED}.")
    else:
        lines += ["| model | " + " | ".join(map(_category, columns)) + " |", "|---|" + "---:|" * len(columns)]
        for name, scores in llava["rows"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(scores.get(c), percent=False) for c in columns) + " |")
        lines.append(f"| _{FLOOR_NAME}_ | " + " | ".join(_cell(llava["floor"].get(c), percent=False) for c in columns) + " |")

    if report["figures"]:
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in report["figures"]]

    env = report["environment"]
    lines += ["", "## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Wall time per step", "",
              "Reused steps keep the time they took when they ran. The load is the machine's 1-minute load average "
              "when the step ended (other jobs on the same cores slow every step).", "",
              "| step | status | wall time | load |", "|---|---|---:|---:|"]
    for row in report["steps"]:
        seconds, load = row["seconds"], row.get("load_1min")
        lines.append(f"| {row['title']} | {row['status']} | {'-' if seconds is None else format_seconds(seconds)} | "
                     f"{'-' if load is None else f'{load:.1f}'} |")
    lines += [f"| **total** | | **{format_seconds(report['total_seconds'])}** | |", ""]
    return "\n".join(lines)


def write_report(config: DemoConfig, steps: list[Step], state: dict, reused: set[str]) -> dict:
    """Build the report and its figures, and write report.json and report.md (atomically) into out_dir."""
    from llm2clip.demo.figures import draw_figures

    report = build_report(config, steps, state, reused)
    out_dir = Path(config.out_dir)
    log_path = Paths(config).logs / "report.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        transformers_logging.disable_progress_bar()  # its handler holds the console, not the redirected stream
        transformers_logging.set_verbosity_error()
        report["figures"] = [str(p.relative_to(out_dir)) for p in draw_figures(config, report)]
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))
    return report
