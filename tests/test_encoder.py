"""LLMEncoder on tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma models, plus `llm2clip encode`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, GPT2Config, PreTrainedTokenizerFast

from llm2clip.cli import main
from llm2clip.errors import InputError
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.pooling import POOLING_MODES
from llm2clip.text.prompts import SEPARATOR, apply_template, truncate_words

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
WORDS = "a an the red blue green crimson small big circle square box triangle left right of above below and".split()
TEXTS = [
    "a red circle",
    "the big blue square left of a small green triangle",
    "crimson box",
    "a small triangle above the big red circle and a blue box",
    "green",
]


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE that adds BOS, like Llama's tokenizers."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(400)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(out: Path, model_type: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_args) -> Path:
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_args,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session", params=ARCHITECTURES)
def model_dir(request, tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer)


def add_lora(encoder: LLMEncoder, seed: int = 1) -> None:
    """Wrap the encoder's model in a LoRA whose B is non-zero, so that it changes the outputs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    encoder.model = get_peft_model(encoder.model, config)
    encoder.model.eval()


def test_attention_is_bidirectional(model_dir):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode="bos_token")
    first = encoder.encode(["a red circle", "a red square"], show_progress=False)
    assert not torch.allclose(first[0], first[1], atol=1e-4)  # BOS state sees the last word
    batch = encoder.tokenize(encoder.prepare_texts(["a red circle", "a red square"]))
    causal = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    start = batch["attention_mask"].argmax(dim=1)
    assert torch.allclose(causal[0, start[0]], causal[1, start[1]], atol=1e-6)  # causal: it does not


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_every_pooling_mode(model_dir, mode):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode=mode)
    embeddings = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    assert embeddings.shape == (len(TEXTS), encoder.embedding_dim) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()


def test_encode_keeps_input_order(model_dir):
    encoder = LLMEncoder.from_pretrained(model_dir)
    embeddings = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    order = [3, 0, 4, 2, 1]
    shuffled = encoder.encode([TEXTS[i] for i in order], batch_size=2, show_progress=False)
    torch.testing.assert_close(shuffled, embeddings[order], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token", "bos_token"])
def test_left_padding_does_not_change_embeddings(model_dir, mode):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode=mode)
    alone = encoder.encode([TEXTS[0]], show_progress=False)
    batched = encoder.encode([TEXTS[0], TEXTS[3]], show_progress=False)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_instruction_is_masked_out_of_mean_pooling(model_dir, tokenizer):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode="mean")
    prepared = encoder.prepare_texts([TEXTS[1]], instruction="Retrieve the caption")
    assert prepared == [f"Retrieve the caption {SEPARATOR}{TEXTS[1]}"]
    features = encoder.tokenize(prepared)
    n_text = len(tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"])
    assert features["embed_mask"].sum() == n_text and features["embed_mask"][0, -n_text:].all()
    hidden = encoder.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                           is_causal=False).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(encoder(features), hidden[:, -n_text:].mean(dim=1), atol=1e-5, rtol=0)
        encoder.skip_instruction = False
        assert not torch.allclose(encoder(features), hidden[:, -n_text:].mean(dim=1), atol=1e-4)


def test_adapter_saved_and_loaded_matches_in_memory_peft(model_dir, tmp_path):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode="weighted_mean", max_length=64)
    base = encoder.encode(TEXTS, show_progress=False)
    add_lora(encoder)
    in_memory = encoder.encode(TEXTS, show_progress=False)
    assert not torch.allclose(base, in_memory, atol=1e-4)
    encoder.save_pretrained(tmp_path / "adapter", merge=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    merged = LLMEncoder.from_pretrained(model_dir, adapters=[tmp_path / "adapter"])
    assert merged.pooling_mode == "weighted_mean" and merged.max_length == 64  # its llm2vec_config.json
    assert not isinstance(merged.model, PeftModel)
    torch.testing.assert_close(merged.encode(TEXTS, show_progress=False), in_memory, atol=1e-5, rtol=0)
    wrapped = LLMEncoder.from_pretrained(model_dir, adapters=[tmp_path / "adapter"], merge_adapters=False)
    assert isinstance(wrapped.model, PeftModel)
    torch.testing.assert_close(wrapped.encode(TEXTS, show_progress=False), in_memory, atol=1e-5, rtol=0)


def test_save_pretrained_round_trip(model_dir, tmp_path):
    encoder = LLMEncoder.from_pretrained(model_dir, pooling_mode="last_token", doc_max_length=300)
    add_lora(encoder)
    expected = encoder.encode(TEXTS, show_progress=False)
    out = tmp_path / "encoder"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    encoder.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no temp dirs left
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())  # what transformers 4.44 needs
    assert tokenizer_config["tokenizer_class"] != "TokenizersBackend"  # a class transformers 4 knows
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert all(isinstance(m, str) for m in json.loads((out / "tokenizer.json").read_text())["model"]["merges"])
    settings = json.loads((out / "llm2vec_config.json").read_text())
    assert settings == {"pooling_mode": "last_token", "max_length": 512, "doc_max_length": 300,
                        "skip_instruction": True}
    loaded = LLMEncoder.from_pretrained(out)
    torch.testing.assert_close(loaded.encode(TEXTS, show_progress=False), expected, atol=1e-5, rtol=0)


def test_llm2vec_mntp_layout_merges_the_adapter_beside_the_config(llama_dir, tmp_path):
    """McGill-NLP's MNTP repos hold config.json + adapter + tokenizer; the base weights are elsewhere."""
    encoder = LLMEncoder.from_pretrained(llama_dir)
    add_lora(encoder)
    expected = encoder.encode(TEXTS, show_progress=False)
    encoder.save_pretrained(tmp_path / "mntp", merge=False)
    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "mntp" / "config.json").write_text(json.dumps(config))
    loaded = LLMEncoder.from_pretrained(tmp_path / "mntp")
    assert not isinstance(loaded.model, PeftModel)
    torch.testing.assert_close(loaded.encode(TEXTS, show_progress=False), expected, atol=1e-5, rtol=0)


def test_template_name_comes_from_config_and_survives_saving(llama_dir, tmp_path):
    name = "meta-llama/Meta-Llama-3-8B-Instruct"
    encoder = LLMEncoder.from_pretrained(llama_dir, model_name=name)
    expected = f"<|start_header_id|>user<|end_header_id|>\n\nFind it {SEPARATOR}a cat<|eot_id|>"
    assert encoder.prepare_texts(["a cat"], instruction="Find it ") == [expected]
    encoder.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["_name_or_path"] == name
    assert LLMEncoder.from_pretrained(tmp_path / "saved").model_name == name
    assert LLMEncoder.from_pretrained(llama_dir).model_name == ""  # no template, as llm2vec for a local dir


@pytest.mark.parametrize(
    ("name", "model_type", "mode", "expected"),
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama", "eos_token",
         "<|start_header_id|>user<|end_header_id|>\n\nq !@#$%^&*()a cat<|eot_id|>"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", "mean", "[INST] q !@#$%^&*()a cat [/INST]"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama", "eos_token", "[INST] q !@#$%^&*()a cat [/INST] </s>"),
        ("google/gemma-2-9b-it", "gemma", "eos_token", "<bos><start_of_turn>user\nq !@#$%^&*()a cat<end_of_turn><eos>"),
        ("Qwen/Qwen2-7B-Instruct", "qwen2", "mean", "<|im_start|>user\nq !@#$%^&*()a cat<|im_end|>"),
        ("Qwen/Qwen2-1.5B-Instruct", "qwen2", "eos_token", "<|im_start|>user\nq !@#$%^&*()a cat<|im_end|><|endoftext|>"),
        ("meta-llama/Meta-Llama-3-8B", "llama", "eos_token", "q !@#$%^&*()a cat<|end_of_text|>"),
        ("/some/local/dir", "mistral", "eos_token", "q !@#$%^&*()a cat </s>"),
        ("/some/local/dir", "qwen3", "eos_token", "q !@#$%^&*()a cat<|im_end|>"),
        ("/some/local/dir", "llama", "last_token", " q !@#$%^&*()a cat "),
    ],
)
def test_prompt_templates_of_named_models(name, model_type, mode, expected):
    text = " q !@#$%^&*()a cat " if mode == "last_token" else "q !@#$%^&*()a cat"  # untouched without template
    assert apply_template(text, name, model_type, mode, eos_token="<|im_end|>") == expected


def test_long_documents_are_cut_word_by_word(tokenizer):
    long_text = " ".join(["the big red circle"] * 20)
    texts, n_cut = truncate_words([long_text, "a box"], tokenizer, max_length=512, doc_max_length=10)
    assert n_cut == 1 and texts[1] == "a box" and long_text.startswith(texts[0])
    assert len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) <= 10


def test_texts_longer_than_max_length_warn_with_count(llama_dir, tokenizer):
    limit = len(tokenizer(TEXTS[0])["input_ids"])
    encoder = LLMEncoder.from_pretrained(llama_dir, max_length=limit, doc_max_length=100)
    with pytest.warns(UserWarning, match=f"^2 of 3 texts were truncated to max_length={limit} tokens$"):
        embeddings = encoder.encode([TEXTS[0], TEXTS[1], TEXTS[3]], show_progress=False)
    assert embeddings.shape[0] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling_mode": "max"}, "unknown pooling mode 'max'"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"adapters": ["/no/such/adapter"]}, "/no/such/adapter has no adapter_config.json"),
    ],
)
def test_bad_arguments(llama_dir, kwargs, message):
    with pytest.raises(InputError, match=message):
        LLMEncoder.from_pretrained(llama_dir, **kwargs)


def test_bad_model_directories(tmp_path, llama_dir):
    with pytest.raises(InputError, match="model directory not found: .*missing"):
        LLMEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty has no config.json"):
        LLMEncoder.from_pretrained(tmp_path / "empty")
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match="unsupported model_type 'gpt2'; supported: llama, mistral"):
        LLMEncoder.from_pretrained(tmp_path / "gpt2")
    odd = shutil.copytree(llama_dir, tmp_path / "odd")
    (odd / "llm2vec_config.json").write_text(json.dumps({"pooling": "mean"}))
    with pytest.raises(InputError, match="unknown key.*pooling; valid: pooling_mode"):
        LLMEncoder.from_pretrained(odd)


def test_bad_texts(llama_dir):
    encoder = LLMEncoder.from_pretrained(llama_dir)
    with pytest.raises(InputError, match="no texts"):
        encoder.encode([], show_progress=False)
    with pytest.raises(InputError, match="text 1 is empty"):
        encoder.encode(["a box", "  "], show_progress=False)


def test_cli_encodes_a_text_file(llama_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out" / "emb.npy"
    assert main(["encode", "--model", str(llama_dir), "--pooling", "weighted_mean", "--out", str(out),
                 "--batch-size", "2", str(texts)]) == 0
    array = np.load(out)
    assert array.shape == (len(TEXTS), 32) and array.dtype == np.float32
    assert f"N={len(TEXTS)}" in capsys.readouterr().out
    expected = LLMEncoder.from_pretrained(llama_dir, pooling_mode="weighted_mean").encode(TEXTS, show_progress=False)
    np.testing.assert_allclose(array, expected.numpy(), atol=1e-5)


def test_cli_errors(llama_dir, tmp_path, capsys):
    def run(model: Path, text_file: Path, *extra: str) -> str:
        assert main(["encode", "--model", str(model), "--out", str(tmp_path / "e.npy"), str(text_file), *extra]) == 1
        return capsys.readouterr().err

    good = tmp_path / "good.txt"
    good.write_text("a red circle\n")
    assert "model directory not found" in run(tmp_path / "nope", good)
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert "unsupported model_type 'gpt2'" in run(tmp_path / "gpt2", good)
    assert "text file not found" in run(llama_dir, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in run(llama_dir, tmp_path / "empty.txt")
    (tmp_path / "gap.txt").write_text("a red circle\n\na blue box\n")
    assert "gap.txt: line 2 is empty" in run(llama_dir, tmp_path / "gap.txt")
    assert not (tmp_path / "e.npy").exists()


def test_cli_warns_about_truncated_texts(llama_dir, tokenizer, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    limit = len(tokenizer(TEXTS[0])["input_ids"])
    n_long = sum(len(tokenizer(text)["input_ids"]) > limit for text in TEXTS)
    assert n_long >= 2
    with pytest.warns(UserWarning, match=f"{n_long} of {len(TEXTS)} texts were truncated to max_length={limit}"):
        assert main(["encode", "--model", str(llama_dir), "--out", str(tmp_path / "e.npy"), str(texts),
                     f"max_length={limit}", "doc_max_length=100"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (len(TEXTS), 32)
