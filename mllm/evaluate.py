"""`mllm eval`: lmms-eval on exported LLaVA checkpoints through its `llava_hf` model, side by side.

The synthetic world's held-out QA suite ships as lmms-eval task YAMLs in mllm/lmms_tasks: the group
`synth_qa` and one subtask per question type, `synth_qa_<type>`. Each run copies that folder to
out_dir/lmms_tasks, writes the world's questions beside it (data/<type>.jsonl, image paths made
absolute) and passes it as --include_path. Any other task name (mme, gqa, textvqa_val, pope,
mmbench_en_dev, scienceqa_img, seedbench, ...) goes to lmms-eval as it is; offline, its dataset must
already be in the local Hugging Face cache.

One lmms-eval process per model (batch size 1). out_dir holds lmms_tasks/, one folder per model
with lmms-eval's results, samples and log, and report.json / report.md. For synth_qa the report adds a
reference row: each question type answered with its most common answer, without the image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from llm2clip.data.vocabulary import QA_TYPES
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir
from mllm.lmms_tasks.utils import normalize
from mllm.report import ModelRun, build_report, write_report

SYNTH_GROUP = "synth_qa"
SYNTH_TYPES = QA_TYPES  # one lmms-eval subtask per world question type
TASK_DIR = Path(__file__).parent / "lmms_tasks"
TASKS_FOLDER = "lmms_tasks"  # the run's copy of TASK_DIR, under out_dir
LLAVA_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")  # what lmms-eval's llava_hf loads
DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN_ERROR = re.compile(r"Error during evaluation: (.*?)(?:\. Please set `--verbosity=DEBUG`.*)?$", re.MULTILINE)
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)  # a traceback's last line
GENERATION_ERROR = re.compile(r"Error (.*) in generating$", re.MULTILINE)


@dataclass
class EvalConfig:
    # exported HF Llava directories; the default pair is scripts/train_llava.sh run once per stage-2 tower
    models: list[str] = field(default_factory=lambda: ["runs/llava/llm2clip/export", "runs/llava/clip/export"])
    names: list[str] | None = None  # display names (default: from the paths, see display_names)
    tasks: list[str] = field(default_factory=lambda: [SYNTH_GROUP])  # synth_qa[_<type>] or lmms-eval task names
    world: Path = Path("runs/world")  # the synthetic world, for the synth_qa tasks
    split: str = "test"  # world split of the synth_qa questions: val | test
    limit: int | None = None  # first N samples of each (sub)task; None: all
    device: str | None = None  # cpu | cuda | cuda:N (default: cuda when available)
    dtype: str = "float32"  # auto (the checkpoint's) | float32 | bfloat16 | float16
    offline: bool = True  # run lmms-eval with the Hugging Face Hub and datasets offline
    out_dir: Path = Path("runs/llava/eval")


def display_names(config: EvalConfig) -> list[str]:
    """The given names, or the shortest path endings that tell the models apart once the trailing
    parts they share are dropped (runs/llava/llm2clip/export, runs/llava/clip/export: llm2clip, clip)."""
    if config.names is not None:
        return config.names
    parts = [Path(m).resolve().parts for m in config.models]
    while len(parts) > 1 and min(map(len, parts)) > 1 and len({p[-1] for p in parts}) == 1:
        parts = [p[:-1] for p in parts]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise InputError(f"the same model directory is given twice: {', '.join(config.models)}")


def _folder(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"


def _synth_tasks(config: EvalConfig) -> list[str]:
    valid = [SYNTH_GROUP, *(f"{SYNTH_GROUP}_{t}" for t in SYNTH_TYPES)]
    synth = [task for task in config.tasks if task.startswith(SYNTH_GROUP)]
    unknown = [task for task in synth if task not in valid]
    if unknown:
        raise InputError(f"unknown synthetic task(s) {', '.join(unknown)}; choose from {', '.join(valid)}")
    return synth


def _check(config: EvalConfig) -> list[str]:
    """Validate the config; return the display names."""
    if not config.models:
        raise InputError("no models given (models=DIR[,DIR...])")
    if not config.tasks:
        raise InputError("no tasks given (tasks=synth_qa or lmms-eval task names)")
    if config.names is not None and len(config.names) != len(config.models):
        raise InputError(f"{len(config.names)} names for {len(config.models)} models; give one name per model")
    if config.limit is not None and config.limit < 1:
        raise InputError(f"limit must be at least 1 (or null for all samples), got {config.limit}")
    if config.dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    for model in config.models:
        if re.search(r"[,=]", model):
            raise InputError(f"model path {model!r} holds ',' or '=', which lmms-eval's --model_args cannot carry")
        config_file = Path(model) / "config.json"
        if not config_file.is_file():
            raise InputError(f"{model} is not an exported Llava directory (no config.json); run `mllm export` first")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise InputError(f"{config_file} is not valid JSON: {err}") from None
        if model_type not in LLAVA_MODEL_TYPES:
            raise InputError(f"{model}: model_type {model_type!r} is not one lmms-eval's llava_hf loads "
                             f"({', '.join(LLAVA_MODEL_TYPES)})")
    names = display_names(config)
    folders = [_folder(name) for name in names]
    if len(set(folders)) != len(folders) or TASKS_FOLDER in folders:
        raise InputError(f"model names {', '.join(names)} must differ in letters or digits and not be "
                         f"{TASKS_FOLDER} (they name output folders)")
    return names


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise InputError(f"device {device} asked for, but no CUDA GPU is visible")
        return device if ":" in device else "cuda:0"
    raise InputError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def _read_questions(qa_file: Path, world: Path) -> dict[str, list[dict]]:
    """The world's QA lines grouped by type, image paths made absolute and checked."""
    if not qa_file.is_file():
        raise InputError(f"{qa_file} not found: {world} is not a synthetic world with QA for this split "
                         "(make one with `llm2clip synth`)")
    by_type: dict[str, list[dict]] = {}
    for n, line in enumerate(qa_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = (world / row["image"]).resolve()
            question = {"image": str(image), "question": row["question"], "answer": row["answer"], "type": row["type"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{qa_file} line {n}: need a JSON object with image, question, answer and type "
                             f"({err})") from None
        if not image.is_file():
            raise InputError(f"{qa_file} line {n}: image {image} not found")
        by_type.setdefault(question["type"], []).append(question)
    missing = [t for t in SYNTH_TYPES if t not in by_type]
    if missing:
        raise InputError(f"{qa_file} has no {', '.join(missing)} questions; synth_qa needs every type: "
                         f"{', '.join(SYNTH_TYPES)}")
    return by_type


def write_synth_tasks(world: Path, split: str, out: Path) -> Path:
    """Copy the task YAMLs to `out` with the world's questions beside them; return `out`."""
    by_type = _read_questions(world / "llava" / f"qa_{split}.jsonl", world)
    with atomic_dir(out) as tmp:
        shutil.copytree(TASK_DIR, tmp, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        (tmp / "data").mkdir()
        for qa_type in SYNTH_TYPES:
            lines = [json.dumps(q, ensure_ascii=False) + "\n" for q in by_type[qa_type]]
            (tmp / "data" / f"{qa_type}.jsonl").write_text("".join(lines), encoding="utf-8")
    return out


def majority_answer_scores(world: Path, split: str, tasks: list[str], limit: int | None) -> dict[str, float]:
    """Exact-match scores of answering every question of a type with that type's most common answer in
    the other held-out split, without the image: the floor a model must beat to show that it looks."""
    other = "val" if split == "test" else "test"
    guesses = {
        qa_type: Counter(normalize(q["answer"]) for q in questions).most_common(1)[0][0]
        for qa_type, questions in _read_questions(world / "llava" / f"qa_{other}.jsonl", world).items()
    }
    hits: dict[str, list[float]] = {}
    for qa_type, questions in _read_questions(world / "llava" / f"qa_{split}.jsonl", world).items():
        hits[qa_type] = [float(normalize(q["answer"]) == guesses.get(qa_type)) for q in questions[:limit]]
    scores = {f"{SYNTH_GROUP}_{t}": sum(hits[t]) / len(hits[t]) for t in SYNTH_TYPES if hits.get(t)}
    every = [hit for t in SYNTH_TYPES for hit in hits.get(t, [])]
    scores[SYNTH_GROUP] = sum(every) / len(every)  # lmms-eval's group score: the mean over all samples
    wanted = set(tasks) | ({f"{SYNTH_GROUP}_{t}" for t in SYNTH_TYPES} if SYNTH_GROUP in tasks else set())
    return {task: score for task, score in scores.items() if task in wanted}


def majority_reference(world: Path, split: str, synth: list[str], limit: int | None) -> dict | None:
    """The report's no-image row, or None (said once) when the world has no other held-out QA split."""
    other = "val" if split == "test" else "test"
    if not (world / "llava" / f"qa_{other}.jsonl").is_file():
        print(f"mllm eval: no {world / 'llava' / f'qa_{other}.jsonl'}, so no majority-answer row in the report")
        return None
    return {"name": "majority answer, no image", "scores": majority_answer_scores(world, split, synth, limit)}


def lmms_eval_command(model: str, config: EvalConfig, device: str, include: Path | None, out: Path) -> list[str]:
    model_args = f"pretrained={Path(model).resolve()},dtype={config.dtype},device_map={device}"
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_hf", "--model_args", model_args,
               "--tasks", ",".join(config.tasks), "--batch_size", "1", "--device", device,
               "--output_path", str(out.resolve()), "--log_samples"]
    if include is not None:
        command += ["--include_path", str(include.resolve())]
    if config.limit is not None:
        command += ["--limit", str(config.limit)]
    return command


def _run_logged(command: list[str], env: dict[str, str], log_file: Path) -> tuple[int, str]:
    """Run `command`, echoing its output and keeping it in `log_file`; return the exit code and the text."""
    with open(log_file, "w", encoding="utf-8") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    return proc.returncode, ANSI.sub("", log_file.read_text(encoding="utf-8"))


def _failure(log: str, code: int) -> str:
    """Why lmms-eval stopped: its last error line, with the first exception raised when that says more."""
    errors = RUN_ERROR.findall(log)
    lines = [line for line in log.splitlines() if line.strip()]
    reason = errors[-1] if errors else (lines[-1] if lines else f"exit code {code}")
    raised = EXCEPTION.findall(log)
    if raised and raised[0][1] not in reason:
        reason += f" (first raised: {raised[0][0]}: {raised[0][1]})"
    if "OfflineModeIsEnabled" in log:
        reason += "; offline, a task's dataset must already be in the local Hugging Face cache (or set offline=false)"
    return reason


def run_model(name: str, model: str, command: list[str], env: dict[str, str], out: Path) -> dict:
    """Run lmms-eval on one model and return its results JSON; fail loudly where lmms-eval only logs."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_file = out / "lmms_eval.log"
    code, log = _run_logged(command, env, log_file)
    results = sorted(out.glob("*/*_results.json"))
    what = f"lmms-eval on model '{name}' ({model})"
    if code != 0 or not results:
        raise InputError(f"{what} failed: {_failure(log, code)}. Full log: {log_file}")
    failed = GENERATION_ERROR.findall(log)
    if failed:
        raise InputError(f"{what} could not generate an answer for {len(failed)} sample(s): {failed[0]}. "
                         f"Full log: {log_file}")
    return json.loads(results[-1].read_text(encoding="utf-8"))


def evaluate(config: EvalConfig) -> dict:
    names = _check(config)
    synth = _synth_tasks(config)
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = write_synth_tasks(Path(config.world), config.split, out_dir / TASKS_FOLDER) if synth else None
    env = {**os.environ, **(OFFLINE_ENV if config.offline else {})}
    prefix = [f"{k}={v}" for k, v in OFFLINE_ENV.items()] if config.offline else []
    reference = majority_reference(Path(config.world), config.split, synth, config.limit) if synth else None
    runs = []
    for name, model in zip(names, config.models):
        command = lmms_eval_command(model, config, device, include, out_dir / _folder(name))
        print(f"mllm eval: {name} ({model}) on {', '.join(config.tasks)}", flush=True)
        results = run_model(name, model, command, env, out_dir / _folder(name))
        runs.append(ModelRun(name, model, shlex.join(prefix + command), results))
    settings = {
        "lmms_eval_model": "llava_hf",
        "tasks": config.tasks,
        "limit": config.limit,
        "world": str(config.world) if synth else None,
        "split": config.split if synth else None,
        "device": device,
        "dtype": config.dtype,
    }
    report = build_report(runs, version("lmms_eval"), settings, reference)
    print(write_report(report, out_dir))
    print(f"mllm eval: wrote {out_dir / 'report.md'} and {out_dir / 'report.json'}")
    return report
