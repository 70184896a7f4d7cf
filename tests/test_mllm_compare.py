"""`mllm compare`: seeds of each model tabled as mean ± std and range, beside the no-image floor."""

from __future__ import annotations

import json
import statistics

import pytest

from llm2clip.errors import InputError
from mllm.cli import main as mllm_main
from mllm.compare import CompareConfig, compare

COLUMNS = ["synth_qa", "synth_qa_color"]
FLOOR = {"name": "majority answer, no image", "scores": {"synth_qa": 0.3, "synth_qa_color": 0.12}}


def write_report(path, scores: dict, reference: dict | None = FLOOR, columns: list[str] = COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"columns": columns, "reference": reference,
                                "models": [{"name": "x", "path": "p", "scores": scores}]}))
    return str(path)


def test_groups_are_summarised_over_their_runs(tmp_path):
    runs = {"a": [0.4, 0.5, 0.9], "b": [0.2, 0.3, 0.1]}
    reports, groups = [], []
    for group, values in runs.items():
        for seed, value in enumerate(values):
            reports.append(write_report(tmp_path / f"{group}{seed}" / "report.json",
                                        {"synth_qa": value, "synth_qa_color": 1 - value}))
            groups.append(group)
    result = compare(CompareConfig(reports=reports, groups=groups, out_dir=tmp_path / "out"))
    for group, values in runs.items():
        cell = result["groups"][group]["synth_qa"]
        assert cell["mean"] == pytest.approx(statistics.mean(values))
        assert cell["std"] == pytest.approx(statistics.stdev(values))
        assert (cell["min"], cell["max"], cell["runs"]) == (min(values), max(values), 3)
        assert result["groups"][group]["synth_qa_color"]["mean"] == pytest.approx(1 - statistics.mean(values))
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| a | 0.600 ± 0.265 |" in text and "| _majority answer, no image_ | 0.300 | 0.120 |" in text
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["reference"] == FLOOR


@pytest.mark.parametrize(("second", "message"), [
    ({"reference": {"name": "majority answer, no image", "scores": {"synth_qa": 0.5}}}, "different no-image"),
    ({"columns": ["synth_qa"]}, "different columns"),
])
def test_reports_of_other_questions_are_refused(tmp_path, second, message):
    first = write_report(tmp_path / "1" / "report.json", {"synth_qa": 0.4, "synth_qa_color": 0.2})
    other = write_report(tmp_path / "2" / "report.json", {"synth_qa": 0.4}, **second)
    with pytest.raises(InputError, match=message):
        compare(CompareConfig(reports=[first, other], groups=["a", "a"], out_dir=tmp_path / "out"))


def test_bad_input_is_one_line(tmp_path, capsys):
    report = write_report(tmp_path / "1" / "report.json", {"synth_qa": 0.4, "synth_qa_color": 0.2})
    assert mllm_main(["compare", "--reports", report, "--groups", "a,b", "--out", str(tmp_path / "o")]) != 0
    assert "one group name per report: 1 reports, 2 groups" in capsys.readouterr().err
    assert mllm_main(["compare", "--reports", str(tmp_path / "none.json"), "--groups", "a",
                      "--out", str(tmp_path / "o")]) != 0
    assert "no report at" in capsys.readouterr().err
