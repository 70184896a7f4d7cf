"""`llm2clip demo`: which steps run or are reused, the report built from fabricated step outputs, and (slow) the
quick profile end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.demo import runner
from llm2clip.demo.config import DEFAULT_CONFIG, DemoConfig, Targets, check_config
from llm2clip.demo.report import build_claims, build_report, collect_cra, collect_eval, collect_llava, markdown
from llm2clip.demo.state import forget_from, plan_run, read_state, write_state
from llm2clip.demo.steps import CRA_KINDS, Call, Paths, Step, build_steps
from llm2clip.config import load_config
from llm2clip.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["world", "tiny-llm", "mntp", "contrastive"]


def _state(fingerprints: dict[str, str]) -> dict:
    return {"steps": {k: {"fingerprint": f, "seconds": 1.0} for k, f in fingerprints.items()}}


# --- state: what a run redoes -------------------------------------------------------------------------------------

def test_a_fresh_run_starts_at_the_first_step():
    plan = plan_run(KEYS, ["a", "b", "c", "d"], {"steps": {}})
    assert (plan.start, plan.reason) == (0, None)


def test_a_finished_run_reuses_every_step():
    assert plan_run(KEYS, ["a", "b", "c", "d"], _state(dict(zip(KEYS, "abcd")))).start == len(KEYS)


def test_an_interrupted_run_resumes_at_the_first_unfinished_step():
    plan = plan_run(KEYS, ["a", "b", "c", "d"], _state({"world": "a", "tiny-llm": "b"}))
    assert (plan.start, plan.reason) == (2, None)


def test_a_changed_config_redoes_that_step_and_says_so():
    plan = plan_run(KEYS, ["a", "b", "C", "d"], _state(dict(zip(KEYS, "abcd"))))
    assert plan.start == 2
    assert "mntp" in plan.reason and "changed" in plan.reason


def test_force_redoes_the_named_step_even_when_nothing_changed():
    plan = plan_run(KEYS, ["a", "b", "c", "d"], _state(dict(zip(KEYS, "abcd"))), force="tiny-llm")
    assert plan.start == 1 and "--force tiny-llm" in plan.reason


def test_force_of_an_unknown_step_names_the_steps():
    with pytest.raises(InputError, match="unknown step 'nope'.*world, tiny-llm"):
        plan_run(KEYS, ["a", "b", "c", "d"], {"steps": {}}, force="nope")


def test_a_missing_step_before_finished_ones_redoes_the_later_ones():
    plan = plan_run(KEYS, ["a", "b", "c", "d"], _state({"world": "a", "mntp": "c", "contrastive": "d"}))
    assert plan.start == 1 and "tiny-llm" in plan.reason


def test_forget_from_drops_the_steps_to_redo():
    state = forget_from(_state(dict(zip(KEYS, "abcd"))), KEYS, 2)
    assert sorted(state["steps"]) == ["tiny-llm", "world"]


def test_state_round_trips_and_a_broken_file_is_a_clear_error(tmp_path):
    assert read_state(tmp_path) == {"steps": {}}
    write_state(tmp_path, _state({"world": "a"}))
    assert read_state(tmp_path)["steps"]["world"]["fingerprint"] == "a"
    (tmp_path / "demo_state.json").write_text("{not json")
    with pytest.raises(InputError, match="demo_state.json is not valid JSON"):
        read_state(tmp_path)


# --- config and fingerprints --------------------------------------------------------------------------------------

def _config(tmp_path: Path, **changes) -> DemoConfig:
    config = load_config(DemoConfig, DEFAULT_CONFIG, [f"out_dir={tmp_path / 'out'}"])
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _fingerprints(config: DemoConfig) -> dict[str, str]:
    return {step.key: step.fingerprint() for step in build_steps(config, check_config(config))}


def test_the_default_config_has_both_profiles_and_every_step(tmp_path):
    config = _config(tmp_path)
    assert {"full", "quick"} <= set(config.profiles)
    keys = [step.key for step in build_steps(config, check_config(config))]
    assert keys == ["world", "tiny-llm", "mntp", "contrastive", "cra", "embed", "stage2", "stage2-clip", "eval",
                    "llava-llm2clip", "llava-clip", "llava-eval"]


def test_a_profile_override_changes_only_its_steps_fingerprint(tmp_path):
    config = _config(tmp_path)
    base = _fingerprints(config)
    profiles = {**config.profiles, "full": {**config.profiles["full"], "stage2": ["train.max_steps=7"]}}
    changed = _fingerprints(_config(tmp_path, profiles=profiles))
    assert [k for k in base if base[k] != changed[k]] == ["stage2"]


def test_a_changed_config_file_changes_the_fingerprint(tmp_path):
    config_file = tmp_path / "mntp.yaml"
    config_file.write_text("train:\n  max_steps: 3\n")
    configs = {**_config(tmp_path).configs, "mntp": str(config_file)}
    before = _fingerprints(_config(tmp_path, configs=configs))
    config_file.write_text("train:\n  max_steps: 4\n")
    after = _fingerprints(_config(tmp_path, configs=configs))
    assert [k for k in before if before[k] != after[k]] == ["mntp"]


def test_a_given_world_skips_synth_and_feeds_the_later_steps(tmp_path):
    world = tmp_path / "my-world"
    world.mkdir()
    steps = build_steps(_config(tmp_path, world=world), {})
    assert steps[0].given == world
    assert str(world) in steps[3].calls[0].args  # stage 1b: --data WORLD


@pytest.mark.parametrize(("changes", "message"), [
    ({"profile": "nope"}, "unknown profile 'nope'"),
    ({"profiles": {"full": {"stage3": []}}}, "unknown command 'stage3'"),
    ({"profiles": {"full": {"stage2": "train.max_steps=3"}}}, "must be a list of KEY=VALUE"),
    ({"configs": {"mntp": "configs/absent.yaml"}}, "config file not found: configs/absent.yaml"),
    ({"world": Path("/absent/world")}, "world: directory not found"),
])
def test_bad_config_is_a_one_line_error(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        check_config(_config(tmp_path, **changes))


# --- the runner, on steps that only write marker files ----------------------------------------------------------

class _ScriptCall(Call):
    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.args[0]]


def _fake_steps(out: Path, fail: str | None = None) -> list[Step]:
    steps = []
    for key in KEYS:
        code = f"open({str(out / 'ran.txt')!r}, 'a').write({key!r} + '\\n'); print('working on {key}')"
        if key == fail:
            code += "; import sys; print('boom'); sys.exit(3)"
        steps.append(Step(key, f"step {key}", [_ScriptCall(key, "", [code])], [out / key]))
    return steps


def _run_fake(monkeypatch, tmp_path, force=None, fail=None, profiles=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    monkeypatch.setattr(runner, "build_steps", lambda config, overrides: _fake_steps(out, fail))
    monkeypatch.setattr("llm2clip.demo.report.write_report",
                        lambda config, steps, state, reused: {"total_seconds": 0.0, "claims": []})
    config = DemoConfig(out_dir=out, force=force, profiles=profiles or {"full": {}})
    runner.run_demo(config)
    ran = (out / "ran.txt").read_text().split()
    (out / "ran.txt").unlink()
    return ran


def test_a_rerun_reuses_finished_steps_and_force_redoes_the_rest(monkeypatch, tmp_path, capsys):
    assert _run_fake(monkeypatch, tmp_path) == KEYS
    assert "[ 1/5] step world ... done in" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):  # nothing ran, so no marker file
        _run_fake(monkeypatch, tmp_path)
    assert "reused" in capsys.readouterr().out
    assert _run_fake(monkeypatch, tmp_path, force="mntp") == ["mntp", "contrastive"]
    state = json.loads((tmp_path / "out" / "demo_state.json").read_text())
    assert set(state["steps"]) == set(KEYS)
    assert all("command" not in r and r["commands"] and r["seconds"] >= 0 for r in state["steps"].values())
    assert (tmp_path / "out" / "logs" / "mntp.log").read_text().splitlines().count("working on mntp") == 1


def test_a_failed_step_names_its_log_and_prints_its_last_lines(monkeypatch, tmp_path, capsys):
    with pytest.raises(InputError, match=r"step 'mntp' \(step mntp\) failed with exit code 3; its log: .*mntp.log"):
        _run_fake(monkeypatch, tmp_path, fail="mntp")
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "boom" in captured.err
    state = json.loads((tmp_path / "out" / "demo_state.json").read_text())
    assert sorted(state["steps"]) == ["tiny-llm", "world"]


# --- the report, from fabricated step outputs ---------------------------------------------------------------------

def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _fabricate(paths: Paths, cra_after_short: float = 0.6, long_i2t=(0.40, 0.20)) -> None:
    models = [str(m) for m in paths.cra_models()]
    for kind in CRA_KINDS:
        after = cra_after_short if kind == "short" else 0.03
        _write(paths.cra(kind), {"images": 500, "chance": 0.002,
                                 "cra": {"bag of words": 0.05, models[0]: 0.01, models[1]: 0.02, models[2]: after}})
    tasks = ("retrieval_short", "retrieval_long", "retrieval_translated", "retrieval_translated_long")

    def metrics(long_value: float) -> dict:
        table = {t: {f"{d} R@{k}": 0.12 for d in ("i2t", "t2i") for k in (1, 5, 10)} for t in tasks}
        table["retrieval_long"]["i2t R@1"] = long_value
        return {**table, "zeroshot": {"top-1": 0.3, "top-5": 0.9}, "cra": {"cra": 0.2}}

    chance = {t: {f"{d} R@{k}": 0.002 * k for d in ("i2t", "t2i") for k in (1, 5, 10)} for t in tasks}
    _write(paths.eval / "report.json", {
        "tasks": {t: {"images": 500, "texts": 1000} for t in tasks},
        "models": [{"name": "LLM2CLIP", "metrics": metrics(long_i2t[0])}, {"name": "CLIP", "metrics": metrics(long_i2t[1])}],
        "chance": {**chance, "zeroshot": {"top-1": 1 / 6, "top-5": 5 / 6}, "cra": {"cra": 0.002}}})
    columns = ["synth_qa", "synth_qa_color", "synth_qa_count"]
    _write(paths.llava_eval / "report.json", {
        "columns": columns,
        "models": [{"name": "llm2clip", "scores": {"synth_qa": 0.40, "synth_qa_color": 0.2, "synth_qa_count": 0.5},
                    "samples": {"synth_qa_color": 500, "synth_qa_count": 500}},
                   {"name": "clip", "scores": {"synth_qa": 0.35, "synth_qa_color": 0.2, "synth_qa_count": 0.4},
                    "samples": {"synth_qa_color": 500, "synth_qa_count": 500}}],
        "reference": {"name": "majority answer, no image", "scores": {"synth_qa": 0.30, "synth_qa_color": 0.14,
                                                                      "synth_qa_count": 0.37}}})


def _claims(paths: Paths, targets: Targets = Targets()) -> dict[str, str]:
    claims = build_claims(collect_cra(paths), collect_eval(paths), collect_llava(paths), targets)
    return {c["id"]: c["result"] for c in claims}


def test_claims_from_fabricated_outputs(tmp_path):
    paths = Paths(DemoConfig(out_dir=tmp_path))
    _fabricate(paths)
    results = _claims(paths)
    assert results["a-short"] == "PASS"  # 1% -> 60%
    assert results["a-long"] == "FAIL"  # 1% -> 3%
    assert results["b-i2t"] == "PASS" and results["b-t2i"] == "FAIL"  # 40 vs 20; 12 vs 12
    assert results["c-i2t"] == "PASS"  # 12% >= 10%, >= CLIP
    assert results["d-i2t"] == "PASS"  # 12% >= 5 x 0.2%
    assert results["e"] == "PASS"  # 0.40 against 0.35 and the floor 0.30 (n = 1000)


def test_a_target_met_within_noise_of_its_floor_fails(tmp_path):
    paths = Paths(DemoConfig(out_dir=tmp_path))
    _fabricate(paths, cra_after_short=0.015)
    # +0.5 point meets a 0.4-point target, but on 500 images one standard error of 1% is 0.45 points
    assert _claims(paths, Targets(cra_gain_points=0.4))["a-short"] == "FAIL"
    assert _claims(paths, Targets(cra_gain_points=0.4, noise_z=0.5))["a-short"] == "PASS"


def test_missing_outputs_are_not_measured(tmp_path):
    config = DemoConfig(out_dir=tmp_path)
    steps = build_steps(config, {})
    report = build_report(config, steps, {"steps": {}}, reused=set())
    assert {c["result"] for c in report["claims"]} == {"NOT MEASURED"}
    text = markdown(report)
    assert "not measured" in text and "LLaVA: not measured" in text


def test_a_nan_in_a_step_output_is_an_error_naming_file_and_key(tmp_path):
    paths = Paths(DemoConfig(out_dir=tmp_path))
    _fabricate(paths)
    data = json.loads((paths.eval / "report.json").read_text())
    data["models"][0]["metrics"]["retrieval_long"]["t2i R@5"] = float("nan")
    (paths.eval / "report.json").write_text(json.dumps(data))  # json writes NaN
    with pytest.raises(InputError, match=r"eval/report.json: retrieval_long.t2i R@5 is nan, not a finite number"):
        collect_eval(paths)


def test_the_markdown_has_every_section_in_order_and_clear_names(tmp_path):
    config = DemoConfig(out_dir=tmp_path)
    paths = Paths(config)
    _fabricate(paths)
    steps = build_steps(config, {})
    state = {"steps": {s.key: {"seconds": 10.0} for s in steps}}
    report = build_report(config, steps, state, reused={"world"})
    text = markdown(report)
    sections = ["## Claims", "## Stage 1: caption retrieval accuracy", "## Stage 2: image↔text retrieval",
                "zero-shot", "Caption↔caption R@1 in the joint space", "## LLaVA-1.5", "## Environment",
                "## Wall time per step"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "LLaVA + LLM2CLIP tower" in text and "LLaVA + CLIP tower" in text and "no image (majority answer)" in text
    assert "| synthetic world | reused | 10s | - |" in text and "**2m00s**" in text
    assert "one seed" in text


# --- end to end ---------------------------------------------------------------------------------------------------

def _numbers(value, where="report"):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


@pytest.mark.slow  # the whole pipeline at the quick profile's budget: minutes
def test_the_quick_profile_end_to_end(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "llm2clip.cli", "demo", "--profile", "quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    for section in ("## Claims", "## Stage 1", "## Stage 2", "zero-shot", "## LLaVA-1.5", "## Figures",
                    "## Environment", "## Wall time per step"):
        assert section in text
    assert "not measured" not in text
    assert {c["result"] for c in report["claims"]} <= {"PASS", "FAIL"}
    for where, value in _numbers(report):
        assert math.isfinite(value), where
    assert {Path(f).name for f in report["figures"]} == {"loss_curves.png", "retrieval.png", "llava.png", "examples.png"}
    for figure in report["figures"]:
        assert (out / figure).stat().st_size > 10_000
    assert [s["status"] for s in report["steps"]] == ["ran"] * 12

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in rerun["steps"]] == ["reused"] * 12
    assert [s["seconds"] for s in rerun["steps"]] == [s["seconds"] for s in report["steps"]]
