"""The tiny LLM: tokenizer, pretraining, saving, resuming, and loading under transformers 4.44."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from llm2clip.cli import main
from llm2clip.config import load_config
from llm2clip.errors import InputError
from llm2clip.text.tiny_llm import REPORT, TinyLLMConfig, build_tiny_llm
from llm2clip.text.tokenizer_training import CHAT_TOKENS, SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[1]

COLOURS = {"red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune"}
SHAPES = {"circle": "cercle", "square": "carré", "star": "étoile"}


def write_corpus(path: Path, n_lines: int, seed: int = 0) -> Path:
    """English and French scene sentences, some lines parallel."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(list(SHAPES))
        english = f"A {colour} {shape} is left of the {rng.choice(list(SHAPES))}."
        french = f"Un {SHAPES[shape]} {COLOURS[colour]} est à gauche."
        lines.append(rng.choice([english, french, f"{english} = {french}"]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(corpus: Path, out_dir: Path, **overrides) -> TinyLLMConfig:
    settings = dict(
        corpus=corpus, out_dir=out_dir, vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=64, seq_len=32, batch_size=8, pretrain_steps=5,
        logging_steps=1,
    )
    settings.update(overrides)
    return TinyLLMConfig(**settings)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", 200)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    return build_tiny_llm(tiny_config(corpus, tmp_path_factory.mktemp("tiny") / "llm"))


def test_tokenizer_specials_and_bos(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>", "</s>", "<unk>", "<pad>"
    )
    assert tokenizer.model_max_length == 64
    text = "A red circle is left of the star."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert ids[1:] == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer(text + " </s>").input_ids[-1] == tokenizer.eos_token_id
    for token in CHAT_TOKENS:
        assert tokenizer(token, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    french = "Un carré vert est à gauche. ünïcödé 42"  # byte-level: unseen characters still round-trip
    assert tokenizer.decode(tokenizer(french).input_ids, skip_special_tokens=True) == french
    assert tokenizer.unk_token_id not in tokenizer(french).input_ids


def test_chat_template_renders(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    messages = [{"role": "user", "content": " What colour is the circle? "}, {"role": "assistant", "content": "Red."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nWhat colour is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS, from the template


def test_save_load_round_trip(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    config = model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    assert config.vocab_size == len(tokenizer) and not config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (32, 2, 2)
    assert (built / "model.safetensors").is_file() and not (built / "checkpoints").exists()
    report = json.loads((built / REPORT).read_text())
    assert report["steps"] == 5 and report["parameters"] == model.num_parameters()
    assert report["eval_perplexity"] == pytest.approx(torch.tensor(report["eval_loss"]).exp().item(), rel=1e-5)
    batch = tokenizer(["A red star.", "Un cercle bleu est à gauche."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_rebuild_skips_or_refuses(built, corpus, capsys):
    weights = built / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_llm(tiny_config(corpus, built, save_steps=7)) == built  # intervals do not count
    assert weights.stat().st_mtime_ns == stamp and "skipping" in capsys.readouterr().out
    with pytest.raises(InputError, match="differs in: hidden_size"):
        build_tiny_llm(tiny_config(corpus, built, hidden_size=16))


def test_loss_decreases_on_a_repeated_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 10)
    corpus.write_text(corpus.read_text() * 20)
    out = build_tiny_llm(tiny_config(corpus, tmp_path / "llm", pretrain_steps=30, learning_rate=1e-2))
    report = json.loads((out / REPORT).read_text())
    assert report["train_loss_last"] < 0.6 * report["train_loss_first"]
    assert report["eval_loss"] < report["eval_loss_init"]


def test_the_same_seed_gives_the_same_tokenizer_and_weights(corpus, built, tmp_path):
    torch.manual_seed(123)  # where a fresh process's global RNG starts is anyone's guess
    again = build_tiny_llm(tiny_config(corpus, tmp_path / "llm"))
    for name in ("tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name


def test_zero_steps_saves_the_initial_model(corpus, tmp_path):
    out = build_tiny_llm(tiny_config(corpus, tmp_path / "llm", pretrain_steps=0))
    report = json.loads((out / REPORT).read_text())
    assert report["steps"] == 0 and report["train_loss_first"] is None
    assert report["eval_loss"] == report["eval_loss_init"]
    AutoModelForCausalLM.from_pretrained(out)


def test_interrupted_run_resumes_from_its_checkpoint(corpus, tmp_path, monkeypatch):
    config = tiny_config(corpus, tmp_path / "llm", pretrain_steps=4, save_steps=2)
    save_checkpoint = Trainer._save_checkpoint

    def save_then_crash(self, *args, **kwargs):
        save_checkpoint(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_llm(config)
    assert (config.out_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert not (config.out_dir / REPORT).exists()

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_checkpoint)
    with pytest.raises(InputError, match="unfinished run with other settings"):
        build_tiny_llm(tiny_config(corpus, config.out_dir, pretrain_steps=6))
    build_tiny_llm(config)
    report = json.loads((config.out_dir / REPORT).read_text())
    assert report["resumed_from"] == "checkpoint-2" and report["steps"] == 4
    assert report["train_loss_first"] is not None  # the log history came back with the checkpoint


def test_missing_or_empty_corpus(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="nope.txt"):
        build_tiny_llm(tiny_config(missing, tmp_path / "llm"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="empty.txt"):
        build_tiny_llm(tiny_config(empty, tmp_path / "llm"))
    assert main(["tiny-llm", "--corpus", str(missing), "--out", str(tmp_path / "llm")]) == 1
    assert "corpus not found" in capsys.readouterr().err


def test_yaml_lists_every_default():
    assert load_config(TinyLLMConfig, ROOT / "configs" / "tiny-llm.yaml") == TinyLLMConfig()


PROBE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
texts = ["A red circle is left of the star.", "Un carré vert est à gauche.", "  tabs\\tand ünïcode 42 "]
chat = [{"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "Red."}]
with torch.no_grad():
    logits = model(torch.tensor([tokenizer(texts[0]).input_ids])).logits
print(json.dumps({
    "bos": [tokenizer(t).input_ids for t in texts],
    "plain": [tokenizer(t, add_special_tokens=False).input_ids for t in texts],
    "eos": [tokenizer(t + " </s>").input_ids for t in texts],
    "inputs": sorted(tokenizer(texts[0]).keys()),
    "specials": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
    "chat": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
    "logits": logits[0].tolist(),
}))
"""


@pytest.mark.parity
def test_loads_identically_under_transformers_4_44(built, parity_python):
    def probe(python: str) -> dict:
        run = subprocess.run([python, "-c", PROBE, str(built)], capture_output=True, text=True, check=True)
        return json.loads(run.stdout.strip().splitlines()[-1])

    ours, theirs = probe(sys.executable), probe(parity_python)
    assert theirs["eos"][0][-1] == theirs["specials"][1]
    assert theirs["inputs"] == ["attention_mask", "input_ids"]  # no token_type_ids, which LlamaModel rejects
    for key in ("bos", "plain", "eos", "specials", "chat"):
        assert theirs[key] == ours[key], key
    assert torch.allclose(torch.tensor(theirs["logits"]), torch.tensor(ours["logits"]), atol=1e-5)
