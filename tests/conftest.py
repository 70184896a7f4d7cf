"""Fixtures that several test files share, each built once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaModel

from llm2clip.data.records import read_corpus
from llm2clip.data.synth import SynthConfig, generate_world
from llm2clip.embed.build import EmbedConfig, build_cache
from llm2clip.text.tokenizer_training import save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _save_encoder(out: Path, corpus: Path, seed: int) -> Path:
    """A tiny random Llama caption encoder (32-dim) with a BPE tokenizer trained on `corpus`."""
    tokenizer = train_tokenizer(read_corpus(corpus), vocab_size=1000, model_max_length=256)
    save_tokenizer(tokenizer, out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, above all on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A synthetic world of 20 train, 2 val and 2 test images of 32 px."""
    out = tmp_path_factory.mktemp("small-world")
    generate_world(SynthConfig(out_dir=out, n_train=20, n_val=2, n_test=2, image_size=32))
    return out


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory, small_world) -> Path:
    return _save_encoder(tmp_path_factory.mktemp("encoder"), small_world / "corpus.txt", seed=0)


@pytest.fixture(scope="session")
def other_encoder_dir(tmp_path_factory, small_world) -> Path:
    """Another encoder: the same tokenizer, other random weights."""
    return _save_encoder(tmp_path_factory.mktemp("other-encoder"), small_world / "corpus.txt", seed=1)


@pytest.fixture(scope="session")
def parity_python() -> str:
    """The python of the llm2vec reference venv (LLM2VEC_VENV, default .venv-llm2vec), built on first use."""
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "setup_parity_venv.sh")], capture_output=True, text=True)
    if setup.returncode != 0:
        pytest.fail(f"scripts/setup_parity_venv.sh failed:\n{setup.stderr[-3000:]}")
    return setup.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def causal_lm_dir(tmp_path_factory, encoder_dir) -> Path:
    """A tiny random Llama with an LM head, sharing the session encoder's tokenizer."""
    out = tmp_path_factory.mktemp("causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, small_world, encoder_dir) -> Path:
    """The session encoder's caption-embedding cache of the small world's train split."""
    out = tmp_path_factory.mktemp("cache") / "train"
    build_cache(EmbedConfig(model=encoder_dir, data=small_world, out_dir=out, max_length=64, dtype="float32"))
    return out
