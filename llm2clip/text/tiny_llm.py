"""The tiny LLM: a BPE tokenizer and a small Llama pretrained on a plain-text corpus.

It stands in for a pretrained LLM when no hub is reachable. `out_dir` ends up as an ordinary
Hugging Face model directory (safetensors weights, tokenizer, `training_report.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    set_seed,
)

from llm2clip.config import config_to_dict
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_dir, atomic_write_json, umask_modes
from llm2clip.text.portability import make_config_portable
from llm2clip.text.tokenizer_training import save_tokenizer, train_tokenizer
from llm2clip.training import TrainSettings, loss_curve, resume_checkpoint, training_arguments

REPORT = "training_report.json"


@dataclass
class TinyLLMConfig:
    corpus: Path = Path("runs/world/corpus.txt")  # one sentence per line
    out_dir: Path = Path("runs/tiny-llm")
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 128  # tokens per packed training sequence
    pretrain_steps: int = 150  # 0 saves the randomly initialised model
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    eval_fraction: float = 0.02  # share of corpus lines held out for perplexity
    logging_steps: int = 20
    save_steps: int = 100  # checkpoint interval, so an interrupted run resumes


def build_tiny_llm(config: TinyLLMConfig) -> Path:
    """Train the tokenizer, pretrain the model and save both to `config.out_dir`."""
    start = time.perf_counter()
    _check(config)
    out_dir = Path(config.out_dir)
    lines = _read_corpus(Path(config.corpus))
    fingerprint = _fingerprint(config)
    if _finished(out_dir, fingerprint):
        print(f"tiny-llm: {out_dir} already holds a model built with this config; skipping")
        return out_dir

    checkpoints = out_dir / "checkpoints"
    _claim_checkpoints(checkpoints, fingerprint)
    train_lines, eval_lines = _split(lines, config.eval_fraction, config.seed)
    tokenizer = _tokenizer(checkpoints / "tokenizer", train_lines, config)

    set_seed(config.seed)
    model = LlamaForCausalLM(_llama_config(config, tokenizer))
    train_set = _pack(tokenizer, train_lines, config.seq_len)
    eval_set = _pack(tokenizer, eval_lines, config.seq_len)
    settings = TrainSettings(
        max_steps=config.pretrain_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=1,
        seed=config.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_arguments(settings, checkpoints, per_device_eval_batch_size=config.batch_size),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        train_dataset=train_set,
        eval_dataset=eval_set,
    )
    init_eval_loss = trainer.evaluate()["eval_loss"]
    resumed_from = resume_checkpoint(settings, checkpoints)
    if config.pretrain_steps > 0:
        trainer.train(resume_from_checkpoint=resumed_from)
    eval_loss = trainer.evaluate()["eval_loss"] if config.pretrain_steps > 0 else init_eval_loss

    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "steps": trainer.state.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "train_sequences": len(train_set),
        "eval_lines": len(eval_lines),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_init": init_eval_loss,
        "eval_loss": eval_loss,
        "eval_perplexity_init": math.exp(init_eval_loss),
        "eval_perplexity": math.exp(eval_loss),
        "loss_curve": loss_curve(trainer.state.log_history),
        "config": fingerprint,
    }
    _save(model, tokenizer, report, out_dir)
    shutil.rmtree(checkpoints)
    print(
        f"tiny-llm: saved {out_dir} ({report['parameters']:,} parameters, {report['steps']} steps, "
        f"{report['seconds']} s); held-out perplexity {report['eval_perplexity_init']:.1f} -> "
        f"{report['eval_perplexity']:.1f}"
    )
    return out_dir


def _check(config: TinyLLMConfig) -> None:
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "max_position_embeddings", "seq_len", "batch_size", "logging_steps", "save_steps")
    for key in positive:
        if getattr(config, key) < 1:
            raise InputError(f"tiny-llm: {key} must be at least 1, got {getattr(config, key)}")
    if config.pretrain_steps < 0:
        raise InputError(f"tiny-llm: pretrain_steps must be 0 or more, got {config.pretrain_steps}")
    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise InputError(
            f"tiny-llm: hidden_size ({config.hidden_size}) must divide by num_heads ({config.num_heads}), "
            f"and num_heads by num_kv_heads ({config.num_kv_heads})"
        )
    if config.seq_len > config.max_position_embeddings:
        raise InputError(
            f"tiny-llm: seq_len ({config.seq_len}) exceeds max_position_embeddings ({config.max_position_embeddings})"
        )
    if not 0 < config.eval_fraction < 1:
        raise InputError(f"tiny-llm: eval_fraction must lie between 0 and 1, got {config.eval_fraction}")


def _read_corpus(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"corpus not found: {path} (expected a text file, one sentence per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"corpus {path} is not UTF-8 text: {err}") from err
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise InputError(f"corpus {path} is empty or has a single line; it needs at least 2 (one is held out)")
    return lines


def _fingerprint(config: TinyLLMConfig) -> dict[str, Any]:
    """What decides the result: every setting but paths and intervals, and the corpus content."""
    settings = config_to_dict(config)
    for key in ("corpus", "out_dir", "logging_steps", "save_steps"):
        del settings[key]
    settings["corpus_sha256"] = hashlib.sha256(Path(config.corpus).read_bytes()).hexdigest()
    return settings


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)))


def _finished(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    report_path = out_dir / REPORT
    if not report_path.is_file():
        return False
    built = json.loads(report_path.read_text()).get("config", {})
    if built != fingerprint:
        raise InputError(
            f"{out_dir} already holds a tiny LLM built differently (differs in: {_differences(built, fingerprint)}); "
            "choose another out_dir or delete it"
        )
    return True


def _claim_checkpoints(checkpoints: Path, fingerprint: dict[str, Any]) -> None:
    """Record which run owns `checkpoints`, refusing to resume one started with other settings."""
    marker = checkpoints / "run.json"
    if marker.is_file():
        started = json.loads(marker.read_text())
        if started != fingerprint:
            raise InputError(
                f"{checkpoints} holds an unfinished run with other settings (differs in: "
                f"{_differences(started, fingerprint)}); delete it to start over"
            )
        return
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, fingerprint)


def _split(lines: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(lines) * eval_fraction))
    held_out = set(order[:n_eval])
    train = [line for i, line in enumerate(lines) if i not in held_out]
    return train, [lines[i] for i in sorted(held_out)]


def _tokenizer(path: Path, lines: list[str], config: TinyLLMConfig) -> PreTrainedTokenizerFast:
    """Train once per run; a resumed run reuses the saved tokenizer so the ids cannot drift."""
    if not (path / "tokenizer.json").is_file():
        tokenizer = train_tokenizer(lines, config.vocab_size, config.max_position_embeddings)
        with atomic_dir(path) as tmp:
            save_tokenizer(tokenizer, tmp)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _llama_config(config: TinyLLMConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _pack(tokenizer: PreTrainedTokenizerFast, lines: list[str], seq_len: int) -> Dataset:
    """Lines as `<s> text </s>`, concatenated and cut into `seq_len` blocks (the last one shorter)."""
    eos = tokenizer.eos_token_id
    # verbose=False: a line longer than the model is no error here, the stream is cut into blocks.
    stream = [token for ids in tokenizer(lines, verbose=False)["input_ids"] for token in (*ids, eos)]
    return Dataset.from_dict({"input_ids": [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]})


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, report: dict, out_dir: Path) -> None:
    """Write into a temp dir, then move each file in; the report goes last and marks the model finished."""
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir))
    model.config.use_cache = True  # the Trainer turns it off for training
    model.save_pretrained(tmp)
    make_config_portable(tmp)
    save_tokenizer(tokenizer, tmp)
    atomic_write_json(tmp / REPORT, report)
    umask_modes(tmp)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == REPORT):
        os.replace(path, out_dir / path.name)
    tmp.rmdir()
