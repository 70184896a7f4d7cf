"""Logs written to a pipe: no expected-but-alarming library messages, no progress-bar frames.

Each test runs a short command in a subprocess with stdout and stderr on pipes, as a log file would get them.
"""

import os
import subprocess
import sys
import warnings

import pytest

from llm2clip.logs import EXPECTED

SILENCED = [
    *(prefix for _, prefix in EXPECTED),  # DeepSpeed's "Setting accelerator to CPU"
    "LOAD REPORT",  # transformers' table for the LM head that a base-model encoder leaves unused
    "indexing errors",  # the tokenizer's alarm about texts that are in fact truncated (or packed) safely
    "mean and covariance",  # transformers' note on the new embedding rows of LLaVA's added tokens
]
TINY_CLIP = ["model_type=clip", "vision.image_size=32", "vision.patch_size=8", "vision.hidden_size=32",
             "vision.num_layers=2", "vision.num_heads=2", "vision.intermediate_size=64", "projection_dim=16",
             "text.hidden_size=32", "text.num_layers=2", "text.num_heads=2", "text.intermediate_size=64",
             "text.vocab_size=400", "train.batch_size=4", "train.max_steps=3", "train.logging_steps=1",
             "train.save_steps=100", "train.dataloader_workers=0", "train.precision=fp32"]


def run_piped(*args: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def assert_quiet(log: str) -> None:
    for message in SILENCED:
        assert message not in log, f"{message!r} in the log:\n{log[-3000:]}"
    assert "\r" not in log, f"progress-bar frames in the log:\n{log[-3000:]!r}"


def test_a_training_run_logs_one_line_per_logging_step(small_world, tmp_path):
    log = run_piped("llm2clip.cli", "stage2", f"data={small_world}", f"out_dir={tmp_path / 'out'}", *TINY_CLIP,
                    cwd=tmp_path)
    assert_quiet(log)
    assert sum(line.startswith("{'loss'") for line in log.splitlines()) == 3, log  # the Trainer's lines stay
    assert "stage2: 3 steps" in log


def test_encoding_with_a_causal_lm_checkpoint_warns_only_of_the_truncation(causal_lm_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n" + "a small red circle left of a large blue square and " * 40 + "\n")
    log = run_piped("llm2clip.cli", "encode", "--model", str(causal_lm_dir), "--out", str(tmp_path / "out.npy"),
                    str(texts), "max_length=64", cwd=tmp_path)
    assert_quiet(log)
    assert "1 of 2 texts were truncated to max_length=64 tokens" in log  # what a user must know stays
    assert "encoded N=2 texts" in log


@pytest.mark.parametrize(("extra", "warned"), [("lm_head.bias", False), ("score.weight", True)])
def test_the_encoder_warns_of_unexpected_weights_but_an_lm_head(causal_lm_dir, tmp_path, extra, warned):
    from safetensors.torch import load_file, save_file

    from llm2clip.text.encoder import LLMEncoder

    for path in causal_lm_dir.iterdir():
        if path.name != "model.safetensors":
            (tmp_path / path.name).symlink_to(path)
    weights = load_file(causal_lm_dir / "model.safetensors")
    weights[extra] = weights["lm_head.weight"][:, 0].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLMEncoder.from_pretrained(tmp_path, device="cpu")
    messages = [str(w.message) for w in caught if "when loading the encoder" in str(w.message)]
    assert messages == ([f"{tmp_path}: 1 unexpected weight(s) when loading the encoder, such as {extra}"]
                        if warned else []), messages
