"""Every shell command shown in README.md and in the comments of configs/*.yaml, exercised.

- `llm2clip ...`, `mllm ...` and their `torchrun ... -m llm2clip.cli ...` launches are parsed for real with
  `--print-config` (real-scale models and data are absent here, and the flags, overrides and positionals
  are what a reader copies); a `--help` line must print its help.
- `bash scripts/<run script>.sh` runs the script itself against a stub venv whose `llm2clip`, `python` and
  `torchrun` hand each step's command line to the real CLI with `--print-config`: every step the script
  would run must parse, in order, with the environment the README gives it.
- `python bench/<bench>.py ...` must parse its arguments (`--help` after them).
- `bash scripts/test.sh` is what `.ci/run` runs; `bash scripts/lock_env.sh` (minutes, builds venvs) is
  syntax-checked and must be the generator named in the committed locks.
A command of any other form fails the test until a check for it is added here.

Every ```python block of README.md runs, in a fresh interpreter, in a directory laid out as the default run leaves
`runs/` (tiny random models in place of the trained ones), after the README's `llm2clip encode` line has made its
`captions.npy`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip import cli as llm2clip_cli
from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.clip.modeling_llm2clip import clip_image_processor
from mllm import cli as mllm_cli

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:llm2clip|mllm|bash|torchrun|python3?)\s+\S")  # with arguments
FENCE = re.compile(r"^```(\w*)\s*$")
SPAN = re.compile(r"`([^`]+)`")
RUN_SCRIPTS = ("run_stage1.sh", "run_stage2.sh", "train_llava.sh", "run_demo.sh", "compare_llava_towers.sh")


def _readme_commands() -> list[tuple[str, str]]:
    """(where, command) for each shell line of a bash block and each inline code span that is a command."""
    found, block, language = [], None, ""
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            block, language = (None, "") if block is not None else ([], fence.group(1))
            continue
        if block is not None:
            if language in ("bash", "sh", "shell", ""):
                found += _shell_lines(f"README.md:{number}", line, block)
            continue
        found += [(f"README.md:{number}", span) for span in SPAN.findall(line) if COMMAND.match(span)]
    return found


def _shell_lines(where: str, line: str, pending: list[str]) -> list[tuple[str, str]]:
    """Join backslash continuations; drop comments. `pending` carries a continued line between calls."""
    text = re.sub(r"\s+#.*$", "", line).rstrip()
    if text.endswith("\\"):
        pending.append(text[:-1])
        return []
    command = " ".join(part.strip() for part in [*pending, text] if part.strip())
    pending.clear()
    return [(where, command)] if command and not command.startswith("#") else []


def _config_commands() -> list[tuple[str, str]]:
    """Commands in the YAML configs' comments: code spans, `Launch: ...` and indented command lines.
    A `--config ...` there means the file itself."""
    found = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        name = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("#")[2].strip() if line.lstrip().startswith("#") else ""
            candidates = SPAN.findall(comment)
            launch = re.search(r"Launch(?: with)?:?\s+(.*)$", comment)
            if launch:
                candidates.append(launch.group(1).replace("--config ...", f"--config {name}").split("; ")[0].rstrip("."))
            elif COMMAND.match(comment):
                candidates.append(comment)
            found += [(f"{name}:{number}", command) for command in candidates if COMMAND.match(command)]
    return found


def _readme_python_blocks() -> list[tuple[str, str]]:
    """(where, code) for each ```python block of README.md."""
    blocks, code, start, language = [], None, 0, ""
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and code is None:
            code, start, language = [], number, fence.group(1)
        elif fence:
            if language == "python":
                blocks.append((f"README.md:{start}", "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


DOCUMENTED = _readme_commands() + _config_commands()
PYTHON_BLOCKS = _readme_python_blocks()


def test_the_docs_show_commands():
    wheres = {where.split(":")[0] for where, _ in DOCUMENTED}
    assert "README.md" in wheres and any(w.startswith("configs/") for w in wheres)
    assert ("README.md", "bash scripts/test.sh") in {(w.split(":")[0], c) for w, c in DOCUMENTED}


def _split(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value words as an environment, and the argv (optional `[...]` parts kept, unbracketed)."""
    words = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", command))
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _cli_argv(words: list[str]) -> tuple[str, list[str]] | None:
    """('llm2clip' | 'mllm', args) for a console-script call or a torchrun/python -m launch of one."""
    if words[0] in ("llm2clip", "mllm"):
        return words[0], words[1:]
    if words[0] in ("torchrun", "python", "python3") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module in ("llm2clip.cli", "mllm.cli"):
            return module.split(".")[0], words[words.index("-m") + 2 :]
    return None


@pytest.mark.parametrize(("where", "command"), DOCUMENTED, ids=[f"{w} {c[:60]}" for w, c in DOCUMENTED])
def test_documented_command(where, command, tmp_path, capsys):
    env, words = _split(command)
    cli = _cli_argv(words)
    if cli is not None:
        program, args = cli
        main = llm2clip_cli.main if program == "llm2clip" else mllm_cli.main
        if "--help" in args or "-h" in args:
            with pytest.raises(SystemExit) as done:
                main(args)
            assert done.value.code == 0 and capsys.readouterr().out.strip(), f"{where}: `{command}` gave no help"
            return
        code = main([*args, "--print-config"])
        assert code == 0, f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}"
        assert capsys.readouterr().out.strip(), f"{where}: `{command}` printed no config"
        return
    if words[:2] == ["bash", "scripts/test.sh"]:
        assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
        return
    if words[:2] == ["bash", "scripts/lock_env.sh"]:
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / "lock_env.sh")], check=True)
        for lock in ("requirements.lock", "tests/parity/requirements.lock"):
            assert "Generated by scripts/lock_env.sh" in (ROOT / lock).read_text()
        return
    if words[0] in ("python", "python3") and len(words) >= 2 and words[1].startswith("bench/"):
        # A bench's arguments must parse; running it takes minutes (tests/test_bench.py covers its parts).
        done = subprocess.run([sys.executable, words[1], *words[2:], "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0 and "usage:" in done.stdout, f"{where}: `{command}`: {done.stderr[-2000:]}"
        return
    if words[0] == "bash" and len(words) >= 2 and Path(words[1]).name in RUN_SCRIPTS:
        _run_script_on_stub_venv(where, command, words[1], env, tmp_path, words[2:])
        return
    pytest.fail(f"{where}: no check for the documented command `{command}`; add one to tests/test_docs.py")


def _stub_venv(tmp_path: Path) -> Path:
    """A venv whose tools pass every CLI call to the real one with --print-config (and log it)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = shlex.quote(sys.executable)
    stubs = {
        "llm2clip": f'exec {python} -m llm2clip.cli "$@" --print-config',
        "python": f'if [ "$1" = -c ]; then exec {python} "$@"; fi\nexec {python} "$@" --print-config',
        "torchrun": f'while [ "$1" != -m ]; do shift; done\nexec {python} "$@" --print-config',
    }
    for tool, body in stubs.items():
        stub = venv / "bin" / tool
        stub.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "$STUB_LOG"\n{body} > /dev/null\n')
        stub.chmod(0o755)
    # What scripts/setup_env.sh checks before it leaves an environment as it is.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "requirements.lock").read_bytes())
    (venv / ".llm2clip-installed").write_text(digest.hexdigest() + "\n")
    return venv


def _run_script_on_stub_venv(where: str, command: str, script: str, env: dict[str, str], tmp_path: Path,
                             args: list[str] = ()) -> None:
    runs = tmp_path / "runs"
    (runs / "stage1" / "contrastive" / "merged").mkdir(parents=True)  # run_stage2.sh checks for stage 1's encoder
    (runs / "stage1" / "contrastive" / "merged" / "config.json").write_text("{}")
    log = tmp_path / "calls.log"
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path), "RUNS": str(runs),
            "LLM2CLIP_VENV": str(_stub_venv(tmp_path)), "STUB_LOG": str(log)}
    done = subprocess.run(["bash", str(ROOT / script), *args], env={**base, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{where}: `{command}` failed on the stub venv:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    calls = [line for line in log.read_text().splitlines() if " -c " not in f" {line} "]
    assert calls, f"{where}: `{command}` ran no step"


def test_the_readme_shows_python():
    assert PYTHON_BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize(("where", "code"), PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(where, code, tmp_path, encoder_dir, monkeypatch, capsys):
    """The block runs as written, in a fresh interpreter, from a directory holding what it reads."""
    runs = tmp_path / "runs"
    (runs / "stage1" / "contrastive").mkdir(parents=True)
    (runs / "stage1" / "contrastive" / "merged").symlink_to(encoder_dir)
    torch.manual_seed(0)
    model = LLM2CLIPModel(LLM2CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        text_embed_dim=32, adapter_hidden_dim=32, projection_dim=16, text_encoder_name_or_path=str(encoder_dir)))
    model.save_pretrained(runs / "stage2" / "llm2clip" / "final")  # what stage 2 writes: model and processor
    clip_image_processor(32).save_pretrained(runs / "stage2" / "llm2clip" / "final")
    (runs / "world" / "images" / "test").mkdir(parents=True)
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48, 40), colour).save(runs / "world" / "images" / "test" / f"test-{i:05d}.png")
    captions = ["a red square", "a large blue square", "a green square on a dark background", "a yellow circle"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    encode = [c for w, c in DOCUMENTED if w.startswith("README.md") and c.startswith("llm2clip encode --model runs/")]
    assert encode, "README.md shows no `llm2clip encode --model runs/...` line to make the block's captions.npy"
    monkeypatch.chdir(tmp_path)
    assert llm2clip_cli.main(_split(encode[0])[1][1:]) == 0, capsys.readouterr().err

    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, f"{where}: the block fails:\n{done.stderr[-3000:]}"
    best = done.stdout.strip().splitlines()[-1]  # the block ends by printing each image's best caption
    assert re.fullmatch(r"\[\d, \d, \d\]", best) and all(int(i) < len(captions) for i in best[1:-1].split(", ")), best
