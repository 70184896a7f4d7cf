"""`mllm eval`: the synth_qa lmms-eval tasks, their metric, the report, and lmms-eval on a tiny Llava."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from llm2clip.config import config_keys, load_config
from llm2clip.data.synth import SHORT_ANSWER, SynthConfig, generate_world
from llm2clip.errors import InputError
from llm2clip.text.tokenizer_training import train_tokenizer
from mllm.cli import COMMANDS
from mllm.cli import main as mllm_main
from mllm.evaluate import (
    SYNTH_TYPES,
    TASK_DIR,
    EvalConfig,
    display_names,
    evaluate,
    majority_answer_scores,
    majority_reference,
    resolve_device,
    run_model,
    write_synth_tasks,
)
from mllm.lmms_tasks.utils import doc_to_text, doc_to_visual, exact_match, normalize, process_results
from mllm.report import ModelRun, build_report, markdown, write_report
from mllm.templates import chat_template, render

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(SynthConfig(out_dir=out, n_train=5, n_val=5, n_test=12, image_size=32))
    return out


def save_tiny_llava(world: Path, out: Path) -> Path:
    """A random Llava with a 32 px CLIP tower, a 2-layer Llama and the vicuna_v1 template, saved like an export."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer((world / "corpus.txt").read_text().splitlines(), vocab_size=300, model_max_length=256)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(config).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template("vicuna_v1", tokenizer))
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava(world, tmp_path_factory) -> Path:
    return save_tiny_llava(world, tmp_path_factory.mktemp("llava") / "export")


# ---------------------------------------------------------------- the metric and the task hooks, by hand


@pytest.mark.parametrize("prediction, answer, score", [
    ("red", "red", 1.0),
    ("  Red. ", "red", 1.0),
    ("Top-Left", "top left", 1.0),
    ("bottom  right!", "bottom right", 1.0),
    ("Two", "2", 1.0),
    ("zero", "0", 1.0),
    ("3", "three", 1.0),
    ("Yes.", "yes", 1.0),
    ("no", "yes", 0.0),
    ("red circle", "red", 0.0),
    ("top", "top left", 0.0),
    ("", "red", 0.0),
])
def test_exact_match_after_light_normalisation(prediction, answer, score):
    assert exact_match(prediction, answer) == score


def test_normalize():
    assert normalize("How MANY? Five, six_seven") == "how many 5 6 7"


def test_process_results_scores_the_first_response():
    doc = {"answer": "4", "question": "How many shapes are there?"}
    assert process_results(doc, ["four"]) == {"exact_match": 1.0}
    assert process_results(doc, ["five"]) == {"exact_match": 0.0}


def test_prompt_is_the_finetuning_prompt(world):
    question = json.loads((world / "llava" / "qa_test.jsonl").read_text().splitlines()[0])["question"]
    assert doc_to_text({"question": question}) == question + SHORT_ANSWER
    # The world's instruction data asks its questions in the same form.
    finetune = json.loads((world / "llava" / "finetune.json").read_text())
    turns = [turn["value"].removeprefix("<image>\n") for sample in finetune for turn in sample["conversations"]
             if turn["from"] == "human" and turn["value"].endswith(SHORT_ANSWER)]
    assert turns and all(doc_to_text({"question": t.removesuffix(SHORT_ANSWER)}) == t for t in turns)


def test_benchmark_prompt_is_the_finetuning_prompt_under_vicuna_v1(world):
    """lmms-eval's chat llava_hf renders [image, text] parts with the exported processor's template; the
    result must be the prompt the finetune trained on, up to the answer."""
    tokenizer = train_tokenizer((world / "corpus.txt").read_text().splitlines(), vocab_size=300, model_max_length=256)
    template = chat_template("vicuna_v1", tokenizer)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer, chat_template=template)
    doc = json.loads((world / "llava" / "qa_test.jsonl").read_text().splitlines()[0])
    trained = render(template, tokenizer, [{"role": "user", "content": "<image>\n" + doc["question"] + SHORT_ANSWER},
                                           {"role": "assistant", "content": doc["answer"]}])
    visuals = doc_to_visual({"image": str(world / doc["image"])})
    messages = [{"role": "user", "content": [*({"type": "image", "url": v} for v in visuals),
                                              {"type": "text", "text": doc_to_text(doc)}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == trained.text[: trained.targets[0][0]]
    assert prompt.endswith("USER: <image>\n" + doc["question"] + SHORT_ANSWER + " ASSISTANT:")


def test_doc_to_visual_opens_an_rgb_image(world):
    (image,) = doc_to_visual({"image": str(next((world / "images" / "test").glob("*.png")))})
    assert image.mode == "RGB" and image.size == (32, 32)


# ---------------------------------------------------------------- the task folder


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval YAMLs, keeping `!function` references as strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def _task_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_TaskLoader)


def test_task_yamls_cover_every_question_type():
    group = _task_yaml(TASK_DIR / "synth_qa.yaml")
    assert group["group"] == "synth_qa"
    assert group["task"] == [f"synth_qa_{t}" for t in SYNTH_TYPES]
    template = _task_yaml(TASK_DIR / "_synth_qa_template_yaml")
    assert template["dataset_path"] == "json" and template["output_type"] == "generate_until"
    assert template["metric_list"][0]["metric"] == "exact_match"
    for qa_type in SYNTH_TYPES:
        task = _task_yaml(TASK_DIR / f"synth_qa_{qa_type}.yaml")
        assert task["task"] == f"synth_qa_{qa_type}"
        assert task["include"] == "_synth_qa_template_yaml"
        assert task["dataset_kwargs"]["data_files"] == {"test": f"data/{qa_type}.jsonl"}


def test_write_synth_tasks_puts_the_questions_beside_the_yamls(world, tmp_path):
    out = write_synth_tasks(world, "test", tmp_path / "lmms_tasks")
    assert {p.name for p in TASK_DIR.iterdir() if p.name != "__pycache__"} <= {p.name for p in out.iterdir()}
    source = [json.loads(line) for line in (world / "llava" / "qa_test.jsonl").read_text().splitlines()]
    written = 0
    for qa_type in SYNTH_TYPES:
        rows = [json.loads(line) for line in (out / "data" / f"{qa_type}.jsonl").read_text().splitlines()]
        assert [r["question"] for r in rows] == [s["question"] for s in source if s["type"] == qa_type]
        assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
        written += len(rows)
    assert written == len(source)
    write_synth_tasks(world, "val", out)  # a rerun replaces the folder
    assert (out / "data" / "color.jsonl").read_text().count("images/val/") > 0


def _broken_world(world: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "world"
    (copy / "llava").mkdir(parents=True)
    (copy / "images").symlink_to(world / "images")
    lines = (world / "llava" / "qa_test.jsonl").read_text().splitlines()
    (copy / "llava" / "qa_test.jsonl").write_text("\n".join(edit(lines)) + "\n")
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda lines: [line for line in lines if '"size"' not in line], "no size questions"),
    (lambda lines: lines[:3] + ["{not json"] + lines[3:], "line 4"),
    (lambda lines: [lines[0].replace("images/test/", "images/nowhere/")] + lines[1:], "line 1: image"),
    (lambda lines: ['{"image": "x.png"}'] + lines, "line 1: need a JSON object"),
])
def test_bad_world_questions_are_named(world, tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        write_synth_tasks(_broken_world(world, tmp_path, edit), "test", tmp_path / "tasks")


def test_missing_split_is_named(world, tmp_path):
    with pytest.raises(InputError, match="qa_train.jsonl not found"):
        write_synth_tasks(world, "train", tmp_path / "tasks")


# ---------------------------------------------------------------- config checks


def test_display_names_tell_the_models_apart(tmp_path):
    assert display_names(EvalConfig()) == ["llm2clip", "clip"]  # runs/llava/{llm2clip,clip}/export
    config = EvalConfig(models=[str(tmp_path / "a" / "tower" / "export"), str(tmp_path / "b" / "tower" / "export")])
    assert display_names(config) == ["a", "b"]
    assert display_names(EvalConfig(models=[str(tmp_path / "export")])) == ["export"]
    assert display_names(EvalConfig(models=["a", "b"], names=["x", "y"])) == ["x", "y"]
    with pytest.raises(InputError, match="given twice"):
        display_names(EvalConfig(models=[str(tmp_path), str(tmp_path)]))


@pytest.mark.parametrize("overrides, message", [
    ({"models": []}, "no models"),
    ({"tasks": []}, "no tasks"),
    ({"names": ["a", "b"]}, "2 names for 1 models"),
    ({"limit": 0}, "limit must be at least 1"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"tasks": ["synth_qa_texture"]}, "unknown synthetic task"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
])
def test_bad_config_is_named(llava, world, tmp_path, overrides, message):
    config = EvalConfig(**{"models": [str(llava)], "world": world, "out_dir": tmp_path / "eval", **overrides})
    with pytest.raises(InputError, match=message):
        evaluate(config)


def test_bad_model_directories_are_named(llava, tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        evaluate(EvalConfig(models=[str(tmp_path)], out_dir=tmp_path / "eval"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="model_type 'llama' is not one lmms-eval's llava_hf loads"):
        evaluate(EvalConfig(models=[str(tmp_path / "llama")], out_dir=tmp_path / "eval"))
    with pytest.raises(InputError, match="cannot carry"):
        evaluate(EvalConfig(models=[str(llava) + ",dtype=x"], out_dir=tmp_path / "eval"))
    with pytest.raises(InputError, match="must differ"):
        evaluate(EvalConfig(models=[str(llava), str(llava)], names=["a b", "a/b"], out_dir=tmp_path / "eval"))
    with pytest.raises(InputError, match="not be lmms_tasks"):
        evaluate(EvalConfig(models=[str(llava)], names=["lmms_tasks"], out_dir=tmp_path / "eval"))


def test_tiny_eval_yaml_lists_every_default():
    assert load_config(EvalConfig, ROOT / "configs" / "tiny-llava-eval.yaml") == EvalConfig()


def test_eval_command_flags_set_eval_config_keys():
    (command,) = [c for c in COMMANDS if c.words == ("eval",)]
    assert (command.config, command.target) == ("mllm.evaluate:EvalConfig", "mllm.evaluate:evaluate")
    assert {flag.key for flag in command.flags} <= set(config_keys(EvalConfig))


def test_mllm_eval_cli_prints_bad_input_as_one_line(tmp_path, capsys):
    assert mllm_main(["eval", "--models", str(tmp_path), "--limit", "2", "--out", str(tmp_path / "eval")]) == 1
    assert capsys.readouterr().err.strip() == (f"mllm eval: error: {tmp_path} is not an exported Llava directory "
                                               "(no config.json); run `mllm export` first")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_named():
    assert resolve_device(None) == "cpu"
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")


# ---------------------------------------------------------------- lmms-eval failures lmms-eval itself only logs


def _fake_lmms_eval(tmp_path: Path, output: str, write_results: bool) -> list[str]:
    script = f"import pathlib, sys\nsys.stdout.write({output!r})\n"
    if write_results:
        script += f"pathlib.Path({str(tmp_path / 'run' / 'model')!r}).mkdir()\n"
        script += f"pathlib.Path({str(tmp_path / 'run' / 'model' / 'x_results.json')!r}).write_text('{{}}')\n"
    return [sys.executable, "-c", script]


def test_a_failed_run_names_the_model_and_lmms_evals_reason(tmp_path):
    output = ("\x1b[31mERROR\x1b[0m | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: "
              "Tasks not found: gqa_x. Please set `--verbosity=DEBUG` to get more information.\n")
    command = _fake_lmms_eval(tmp_path, output, write_results=False)
    with pytest.raises(InputError, match=r"model 'tower' \(some/dir\) failed: Tasks not found: gqa_x\. Full log"):
        run_model("tower", "some/dir", command, {}, tmp_path / "run")
    assert "Tasks not found" in (tmp_path / "run" / "lmms_eval.log").read_text()


def test_a_run_that_exits_0_without_results_fails_with_the_logged_error(tmp_path):
    # lmms-eval 0.7.3 under filelock 4.3 logs this import error, writes no results and still exits 0.
    output = ("ERROR | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: No module named "
              "'filelock._api'. Please set `--verbosity=DEBUG` to get more information.\n")
    command = _fake_lmms_eval(tmp_path, output, write_results=False)
    assert subprocess.run(command).returncode == 0
    with pytest.raises(InputError, match=r"failed: No module named 'filelock._api'\. Full log"):
        run_model("tower", "some/dir", command, {}, tmp_path / "run")


def test_a_failed_run_adds_the_root_cause_and_the_offline_hint(tmp_path):
    output = ("Traceback (most recent call last):\n"
              "    raise ConnectionError(f\"Couldn't reach '{path}' on the Hub\")\n"
              "ConnectionError: Couldn't reach 'lmms-lab/POPE' on the Hub (OfflineModeIsEnabled)\n"
              "tenacity.RetryError: RetryError[<Future raised ConnectionError>]\n"
              "ERROR | Error during evaluation: RetryError[<Future raised ConnectionError>]. Please set "
              "`--verbosity=DEBUG` to get more information.\n")
    command = _fake_lmms_eval(tmp_path, output, write_results=False)
    with pytest.raises(InputError) as failure:
        run_model("tower", "some/dir", command, {}, tmp_path / "run")
    message = str(failure.value)
    assert "first raised: ConnectionError: Couldn't reach 'lmms-lab/POPE' on the Hub" in message
    assert "dataset must already be in the local Hugging Face cache (or set offline=false)" in message


def test_swallowed_generation_errors_fail_the_run(tmp_path):
    output = ("ERROR | lmms_eval.models.chat.llava_hf:generate_until:108 - "
              "Error Image features and image tokens do not match in generating\n")
    command = _fake_lmms_eval(tmp_path, output, write_results=True)
    with pytest.raises(InputError, match="could not generate an answer for 1 sample"):
        run_model("tower", "some/dir", command, {}, tmp_path / "run")


# ---------------------------------------------------------------- the report


def _results(color: float, pope: float) -> dict:
    """The parts of an lmms-eval results JSON that the report reads."""
    return {
        "results": {
            "synth_qa": {"exact_match,none": (color + 0.5) / 2, "exact_match_stderr,none": 0.1, "alias": "synth_qa"},
            "synth_qa_color": {"alias": " - synth_qa_color", "exact_match,none": color,
                               "exact_match_stderr,none": 0.1, "exact_match_stderr_clustered,none": "N/A"},
            "synth_qa_count": {"alias": " - synth_qa_count", "exact_match,none": 0.5},
            "pope": {"alias": "pope", "pope_accuracy,none": pope, "pope_f1_score,none": pope - 0.1},
            "mme": {"mme_cognition_score,none": 250.0, "mme_percetion_score,none": 1200.5},
        },
        "n-samples": {task: {"original": 12, "effective": 4} for task in ("synth_qa_color", "synth_qa_count")},
    }


def test_report_puts_models_side_by_side(tmp_path):
    command = "python -m lmms_eval --model llava_hf --tasks synth_qa"
    runs = [ModelRun("llm2clip", "runs/a", command, _results(0.75, 0.8)),
            ModelRun("clip", "runs/b", command, _results(0.25, 0.6))]
    del runs[1].results["results"]["mme"]
    settings = {"lmms_eval_model": "llava_hf", "tasks": ["synth_qa", "pope", "mme"], "limit": 4,
                "world": "runs/world", "split": "test", "device": "cpu", "dtype": "float32"}
    report = build_report(runs, "0.7.3", settings)
    assert report["columns"] == ["synth_qa", "synth_qa_color", "synth_qa_count", "pope pope_accuracy",
                                 "pope pope_f1_score", "mme mme_cognition_score", "mme mme_percetion_score"]
    first, second = report["models"]
    assert first["scores"]["synth_qa_color"] == 0.75 and second["scores"]["synth_qa_color"] == 0.25
    assert first["scores"]["pope pope_f1_score"] == pytest.approx(0.7)
    assert "mme mme_cognition_score" not in second["scores"]
    assert first["samples"] == {"synth_qa_color": 4, "synth_qa_count": 4}
    text = write_report(report, tmp_path)
    assert text == markdown(report) == (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "lmms-eval 0.7.3" in text and "first 4 samples of each task" in text
    assert "| llm2clip | 0.625 | 0.750 | 0.500 | 0.800 | 0.700 | 250.0 | 1200.5 |" in text
    assert "| clip | 0.375 | 0.250 | 0.500 | 0.600 | 0.500 | - | - |" in text
    assert text.count(command) == 2


def test_report_adds_the_reference_row_under_the_models(tmp_path):
    runs = [ModelRun("llm2clip", "runs/a", "cmd", _results(0.75, 0.8))]
    reference = {"name": "majority answer, no image", "scores": {"synth_qa_color": 0.125, "synth_qa": 0.25}}
    report = build_report(runs, "0.7.3", {"lmms_eval_model": "llava_hf", "world": None}, reference)
    assert report["reference"] == reference
    lines = markdown(report).splitlines()
    row = lines.index("| _majority answer, no image_ | 0.250 | 0.125 | - | - | - | - | - |")
    assert lines[row - 1].startswith("| llm2clip |")
    assert "majority" not in markdown(build_report(runs, "0.7.3", {"lmms_eval_model": "llava_hf", "world": None}))


def _write_qa(world: Path, split: str, rows: list[tuple[str, str]]) -> None:
    image = next((world / "images").rglob("*.png")).relative_to(world)
    lines = [json.dumps({"image": str(image), "question": "q", "answer": answer, "type": qa_type})
             for qa_type, answer in rows]
    (world / "llava" / f"qa_{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_majority_answer_scores_guess_the_other_splits_most_common_answer(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    every_type = [(t, "x") for t in SYNTH_TYPES]
    _write_qa(copy, "val", every_type + [("color", "red"), ("color", "Red."), ("yesno", "no"), ("yesno", "no")])
    _write_qa(copy, "test", every_type + [("color", "red"), ("color", "blue"), ("color", "red"), ("yesno", "no"),
                                           ("yesno", "no")])
    scores = majority_answer_scores(copy, "test", ["synth_qa"], limit=None)
    assert scores["synth_qa_color"] == pytest.approx(2 / 4)  # "red" (normalised) on x, red, blue, red
    assert scores["synth_qa_yesno"] == pytest.approx(2 / 3)
    assert scores["synth_qa_count"] == 1.0  # "x" is the only count answer in val
    singles = len(SYNTH_TYPES) - 2  # the types with only their "x" sample, all right
    assert scores["synth_qa"] == pytest.approx((2 + singles + 2) / (len(SYNTH_TYPES) + 5))  # over all samples, as lmms-eval
    assert majority_answer_scores(copy, "test", ["synth_qa_color"], limit=2) == {"synth_qa_color": 0.5}  # x, red
    assert majority_answer_scores(copy, "val", ["synth_qa_yesno"], limit=None) == {"synth_qa_yesno": 2 / 3}
    (copy / "llava" / "qa_val.jsonl").unlink()
    assert majority_reference(copy, "test", ["synth_qa"], None) is None  # no other split: no row, no error


# ---------------------------------------------------------------- lmms-eval end to end


@pytest.mark.slow  # one lmms-eval process: about 30 s, most of it importing lmms-eval and indexing its tasks
def test_lmms_eval_on_ten_synthetic_samples(llava, world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    out = tmp_path / "eval"
    report = evaluate(EvalConfig(models=[str(llava)], names=["tiny"], world=world, limit=2, device="cpu", out_dir=out))
    (model,) = report["models"]
    assert report["lmms_eval_version"] == "0.7.3"
    assert report["columns"] == ["synth_qa", *sorted(f"synth_qa_{t}" for t in SYNTH_TYPES)]  # lmms-eval order
    assert model["samples"] == {f"synth_qa_{t}": 2 for t in SYNTH_TYPES}
    assert all(0.0 <= score <= 1.0 for score in model["scores"].values())
    assert "--model llava_hf" in model["command"] and "--limit 2" in model["command"]
    assert model["command"].startswith("HF_HUB_OFFLINE=1")
    assert f"--include_path {out / 'lmms_tasks'}" in model["command"]
    assert (out / "report.md").read_text().count("| tiny |") == 1
    assert report["reference"]["scores"].keys() == set(report["columns"])
    # lmms-eval's own outputs: results, and each sample with the finetuning prompt and a generated answer.
    (samples,) = (out / "tiny").glob("*/*_samples_synth_qa_color.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2 and all(r["input"].endswith(SHORT_ANSWER) for r in rows)
    assert all(r["filtered_resps"] for r in rows)  # a random model still says something


# ---------------------------------------------------------------- scripts/train_llava.sh, its control flow


def _stub_venv(tmp_path: Path) -> Path:
    """A venv whose python and torchrun log their arguments and fail on the word in $STUB_FAIL."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    for tool in ("python", "torchrun"):
        stub = venv / "bin" / tool
        stub.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "$STUB_LOG"\n'
                        'if [ -n "${STUB_FAIL:-}" ] && [[ " $* " == *" $STUB_FAIL "* ]]; then exit 3; fi\n')
        stub.chmod(0o755)
    # What scripts/setup_env.sh checks before it leaves an environment as it is.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "requirements.lock").read_bytes()).hexdigest()
    (venv / ".llm2clip-installed").write_text(digest + "\n")
    return venv


def _train_llava(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    base = {"PATH": os.environ["PATH"], "LLM2CLIP_VENV": str(_stub_venv(tmp_path)), "STUB_LOG": str(log)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_llava.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    calls = [line for line in log.read_text().splitlines() if "mllm.cli" in line]
    return done, calls


def test_train_llava_runs_the_four_steps_in_order_with_the_environment(tmp_path):
    done, calls = _train_llava(tmp_path, VISION_TOWER="t", LLM="l", DATA="w", OUT="o/llm2clip",
                               FINETUNE_CONFIG="ft.yaml")
    assert done.returncode == 0, done.stderr
    assert [call.split()[3] for call in calls] == ["pretrain", "finetune", "export", "eval"]
    assert all(call.startswith("python -m mllm.cli") for call in calls)
    assert "--vision-tower t --llm l --data w/llava/pretrain.json --image-folder w" in calls[0]
    assert "--out o/llm2clip/pretrain" in calls[0]
    assert "finetune --config ft.yaml --model o/llm2clip/pretrain/final --data w/llava/finetune.json" in calls[1]
    assert "export --model o/llm2clip/finetune/final --out o/llm2clip/export" in calls[2]
    assert "eval --models o/llm2clip/export --names llm2clip --world w --out o/llm2clip/eval" in calls[3]
    assert "report in o/llm2clip/eval/report.md" in done.stdout


def test_train_llava_defaults_and_torchrun(tmp_path):
    done, calls = _train_llava(tmp_path, NPROC="2")
    assert done.returncode == 0, done.stderr
    assert calls[0].startswith("torchrun --standalone --nproc_per_node 2 -m mllm.cli pretrain")
    assert "pretrain --config configs/tiny-llava-pretrain.yaml --vision-tower runs/stage2/llm2clip/vision_tower " \
           "--llm runs/tiny-llm --data runs/world/" in calls[0]
    assert "finetune --config configs/tiny-llava-finetune.yaml" in calls[1]
    assert calls[1].startswith("torchrun --standalone --nproc_per_node 2 -m mllm.cli finetune")
    assert calls[2].startswith("python -m mllm.cli export") and calls[3].startswith("python -m mllm.cli eval")
    assert "--out runs/llava/eval" in calls[3]


def test_train_llava_stops_at_the_first_failure_and_names_it(tmp_path):
    done, calls = _train_llava(tmp_path, STUB_FAIL="finetune")
    assert done.returncode == 1
    assert [call.split()[3] for call in calls] == ["pretrain", "finetune"]
    assert "step 'finetune (instructions)' failed (exit 3)" in done.stderr
    done, calls = _train_llava(tmp_path, NPROC="two")
    assert done.returncode == 1 and "NPROC must be a positive integer" in done.stderr and not calls
