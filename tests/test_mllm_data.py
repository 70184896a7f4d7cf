"""mllm data and templates: byte-exact rendering, exact label masks, LLaVA JSON checks, padding, batch order.

The helpers at the top (a tiny tokenizer, LLM, vision tower and LLaVA-format world) serve
tests/test_mllm_train.py too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llm2clip.errors import InputError
from llm2clip.text.tokenizer_training import train_tokenizer
from mllm.builder import BuildSettings, build_llava, image_token_count
from mllm.data import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaDataset,
    ModalityLengthGroupedSampler,
    Sample,
    read_llava_json,
)
from mllm.templates import PLAIN, VICUNA_SYSTEM, chat_template, render, vicuna_v1

COLOURS = ["red", "blue", "green", "pink"]
SHAPES = ["circle", "square", "star"]
CORPUS = [
    f"USER: What color is the {shape}? ASSISTANT: {colour}. Where is the {colour} {shape}? top left, bottom right."
    for colour in COLOURS for shape in SHAPES
] + ["A chat between a curious user and an artificial intelligence assistant. Answer the question using a single "
     "word or phrase. How many shapes are there? yes no 1 2 3 Is there a"]


def make_llm(out: Path) -> Path:
    """A random 2-layer Llama with a 300-token byte-level BPE (BOS <s>, EOS </s>, pad <pad>, Llama-3 chat)."""
    tokenizer = train_tokenizer(CORPUS * 4, vocab_size=300, model_max_length=512)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tower(out: Path) -> Path:
    """A random 2-layer CLIP ViT (32 px, patch 8: 16 patch tokens) with CLIP's image processor."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out)
    return out


def write_world(root: Path) -> Path:
    """Images and LLaVA pretraining / instruction JSON (with a text-only sample) under `root`."""
    (root / "images").mkdir(parents=True)
    pretrain, finetune = [], []
    for i in range(8):
        colour, shape = COLOURS[i % 4], SHAPES[i % 3]
        Image.new("RGB", (40 + 8 * (i % 2), 32), colour).save(root / "images" / f"{i}.png")
        pretrain.append({"id": f"p{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"a {colour} {shape}"}]})
        finetune.append({"id": f"f{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"What color is the {shape}?\n<image>"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": f"Where is the {colour} {shape}?"}, {"from": "gpt", "value": "top left"}]})
    finetune.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "2"}]})
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "finetune.json").write_text(json.dumps(finetune))
    return root


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    settings = BuildSettings(vision_tower=make_tower(root / "tower"), llm=make_llm(root / "llm"))
    return build_llava(settings)[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat color is the star?"},
    {"role": "assistant", "content": "pink"},
    {"role": "user", "content": "Where is the pink star?"},
    {"role": "assistant", "content": "top left"},
]


def test_templates_render_byte_for_byte(processor):
    tokenizer = processor.tokenizer
    assert render(PLAIN, tokenizer, TWO_TURNS[:2]).text == "<image>pink\n"
    assert render(vicuna_v1(), tokenizer, TWO_TURNS).text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the star? ASSISTANT: pink</s>"
        "USER: Where is the pink star? ASSISTANT: top left</s>"
    )
    assert render(vicuna_v1(""), tokenizer, TWO_TURNS[:2]).text == (
        "USER: <image>\nWhat color is the star? ASSISTANT: pink</s>")
    assert render(chat_template("llm", tokenizer), tokenizer, TWO_TURNS[:2]).text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the star?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\npink<|eot_id|>"
    )
    # The processor's form (content parts, an image part first) renders the same bytes, and so does the prompt.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the star?"}]}]
    assert tokenizer.apply_chat_template(parts, chat_template=vicuna_v1(), tokenize=False,
                                         add_generation_prompt=True) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the star? ASSISTANT:"
    )
    assert tokenizer.apply_chat_template(parts, chat_template=PLAIN, tokenize=False, add_generation_prompt=True) \
        == "<image>"
    system = [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:1]
    prompt = tokenizer.apply_chat_template(system, chat_template=vicuna_v1(), tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "Be brief. USER: <image>\nWhat color is the star? ASSISTANT:"


# LLaVA-1.5's own strings, written out from its documented conversation format (llava/conversation.py):
# conv_vicuna_v1 (`--version v1` in LLaVA-1.5's finetune.sh) is system + sep, then per turn ROLE + ": " + text + sep
# for USER and + sep2 for ASSISTANT, with roles USER / ASSISTANT, sep " ", sep2 "</s>" (EOS); an open assistant turn
# is "ASSISTANT:". The <image> placeholder moves to the head of the first human turn (preprocess_multimodal:
# "<image>\n" + the rest stripped). conv_llava_plain (pretraining) is "<image>" + caption + "\n".
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MIX665K_ENTRY = {"id": "000000033471", "image": "images/3.png", "conversations": [
    {"from": "human", "value": "What color is the star?\n<image>"},  # the placeholder at the end, as in 665k
    {"from": "gpt", "value": "pink"},
    {"from": "human", "value": "Where is the pink star?"},
    {"from": "gpt", "value": "top left"},
    {"from": "human", "value": "Is there a red circle?\nAnswer the question using a single word or phrase."},
    {"from": "gpt", "value": "No"},
]}
ANSWERS = ["pink", "top left", "No"]


def test_vicuna_v1_and_plain_render_llava_15_prompt_strings(processor, world, tmp_path):
    tokenizer = processor.tokenizer
    assert VICUNA_SYSTEM == LLAVA_V1_SYSTEM
    (sample,), _ = read_llava_json(_write(tmp_path, [MIX665K_ENTRY]), world)
    expected = (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat color is the star? ASSISTANT: pink</s>"
        "USER: Where is the pink star? ASSISTANT: top left</s>"
        "USER: Is there a red circle?\nAnswer the question using a single word or phrase. ASSISTANT: No</s>"
    )
    assert render(chat_template("vicuna_v1", tokenizer), tokenizer, sample.messages).text == expected
    # Inference asks with an open assistant turn, exactly LLaVA's prompt for the first question.
    prompt = tokenizer.apply_chat_template(sample.messages[:1], chat_template=vicuna_v1(), tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat color is the star? ASSISTANT:"
    # plain: the image, the caption and "\n"; the human's words are dropped.
    caption = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
               {"role": "assistant", "content": "a pink star at the top left"}]
    assert render(PLAIN, tokenizer, caption).text == "<image>a pink star at the top left\n"


def test_vicuna_v1_learns_only_the_answers_and_their_eos(processor, world, tmp_path):
    """As LLaVA's preprocess_v1 masks: BOS, the system line and every "USER: ... ASSISTANT:" are ignored."""
    tokenizer = processor.tokenizer
    (sample,), _ = read_llava_json(_write(tmp_path, [MIX665K_ENTRY]), world)
    item = LlavaDataset([sample], processor, vicuna_v1(), max_length=512)[0]
    assert _learned_runs(item, tokenizer) == [f" {answer}</s>" for answer in ANSWERS]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    masked = [token for token, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert masked[0] == tokenizer.bos_token_id and masked.count(image_id) == image_token_count(processor)
    prompt_text = tokenizer.decode([t for t in masked if t != image_id], skip_special_tokens=False)
    assert prompt_text.replace(" ", "") == (
        f"<s>{LLAVA_V1_SYSTEM} USER: \nWhat color is the star? ASSISTANT:USER: Where is the pink star? ASSISTANT:"
        "USER: Is there a red circle?\nAnswer the question using a single word or phrase. ASSISTANT:"
    ).replace(" ", "")
    assert labels[-1] == tokenizer.eos_token_id  # the last answer's </s> is learned: the model learns to stop


def test_placeholder_anywhere_text_only_and_missing_images_in_665k_form(processor, world, tmp_path):
    middle = {"id": "mid", "image": "images/0.png", "conversations": [
        {"from": "human", "value": "Look at <image> and say: what color?"}, {"from": "gpt", "value": "red"}]}
    text_only = {"id": "text", "conversations": [
        {"from": "human", "value": "How many sides does a square have?"}, {"from": "gpt", "value": "4"},
        {"from": "human", "value": "And a triangle?"}, {"from": "gpt", "value": "3"}]}
    lost = dict(MIX665K_ENTRY, id="lost", image="images/absent.png")
    samples, skipped = read_llava_json(_write(tmp_path, [middle, lost, text_only]), world)
    assert [s.id for s in samples] == ["mid", "text"] and skipped == {"missing image": 1}
    template = chat_template("vicuna_v1", processor.tokenizer)
    # LLaVA strips the placeholder out and puts "<image>\n" first (the double space is LLaVA's too).
    assert render(template, processor.tokenizer, samples[0].messages).text == (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nLook at  and say: what color? ASSISTANT: red</s>")
    assert render(template, processor.tokenizer, samples[1].messages).text == (
        f"{LLAVA_V1_SYSTEM} USER: How many sides does a square have? ASSISTANT: 4</s>"
        "USER: And a triangle? ASSISTANT: 3</s>")
    dataset = LlavaDataset(samples, processor, template, max_length=512)
    with_image, without = dataset[0], dataset[1]
    assert "pixel_values" in with_image and "pixel_values" not in without
    assert processor.tokenizer.convert_tokens_to_ids("<image>") not in without["input_ids"].tolist()
    assert _learned_runs(without, processor.tokenizer) == [" 4</s>", " 3</s>"]


def test_template_choice_errors(processor):
    with pytest.raises(InputError, match="unknown template 'chatml'"):
        chat_template("chatml", processor.tokenizer)
    with pytest.raises(InputError, match="system_prompt applies to the vicuna_v1 template only"):
        chat_template("plain", processor.tokenizer, system="x")
    with pytest.raises(InputError, match="must start with a user turn"):
        render(PLAIN, processor.tokenizer, TWO_TURNS[1:])


def _learned_runs(item: dict, tokenizer) -> list[str]:
    """The labelled tokens, decoded run by run."""
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("template, turns, answers", [
    ("vicuna_v1", 4, [" pink</s>", " top left</s>"]),
    ("llm", 4, ["pink<|eot_id|>", "top left<|eot_id|>"]),
    ("plain", 2, ["pink\n"]),  # a caption pair: the image, then the caption
])
def test_labels_are_exactly_the_assistant_turns(processor, world, template, turns, answers):
    tokenizer = processor.tokenizer
    sample = Sample("conversation", world / "images" / "0.png", TWO_TURNS[:turns], length=9)
    dataset = LlavaDataset([sample], processor, chat_template(template, tokenizer), max_length=512)
    item = dataset[0]
    assert _learned_runs(item, tokenizer) == answers

    # The ids are those the processor gives at inference: each <image> expanded into one token per feature.
    text = render(dataset.chat_template, tokenizer, sample.messages).text
    with Image.open(sample.image) as image:
        expected = processor(text=text, images=image, add_special_tokens=template != "llm", return_tensors="pt")
    assert item["input_ids"].tolist() == expected.input_ids[0].tolist()
    assert torch.equal(item["pixel_values"], expected.pixel_values[0])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (item["input_ids"] == image_id).sum() == image_token_count(processor) == 16
    assert item["input_ids"][0] == tokenizer.bos_token_id and item["input_ids"][1] != tokenizer.bos_token_id


def test_images_are_padded_to_a_square_with_the_mean_colour(processor, tmp_path):
    Image.new("RGB", (64, 32), (0, 0, 0)).save(tmp_path / "wide.png")  # black, letterboxed top and bottom
    sample = Sample("wide", tmp_path / "wide.png", TWO_TURNS[:2], length=5)
    pixels = LlavaDataset([sample], processor, PLAIN, 512)[0]["pixel_values"]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    padded = (torch.tensor([int(m * 255) for m in OPENAI_CLIP_MEAN]) / 255 - mean) / std
    black = -mean / std
    assert torch.allclose(pixels[:, 0, 16], padded, atol=1e-3) and torch.allclose(pixels[:, 31, 16], padded, atol=1e-3)
    assert torch.allclose(pixels[:, 16, 16], black, atol=1e-3)


def test_reading_llava_json(world):
    samples, skipped = read_llava_json(world / "finetune.json", world)
    assert len(samples) == 9 and not skipped
    first, text_only = samples[0], samples[-1]
    assert first.image == world / "images" / "0.png"
    assert first.messages[0] == {"role": "user", "content": "<image>\nWhat color is the circle?"}  # moved first
    assert text_only.image is None and text_only.messages[0]["content"] == "How many shapes are there?"
    assert len(read_llava_json(world / "pretrain.json", world, max_samples=3)[0]) == 3


def _write(tmp_path: Path, entries) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    return path


HUMAN, GPT = {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a star"}


@pytest.mark.parametrize("entry, message", [
    ({"id": "a", "conversations": [HUMAN, GPT]}, "sample 0 \\(id 'a'\\) holds an <image> placeholder but no image"),
    ({"id": "b", "image": "images/0.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, GPT]}, "id 'b'\\) has an image and 2 <image>"),
    ({"id": "c", "image": "images/0.png", "conversations": [GPT, HUMAN]},
     "id 'c'\\): the conversation starts with gpt"),
    ({"id": "d", "image": "images/0.png", "conversations": [HUMAN, GPT, GPT]}, "id 'd'\\).*two gpt turns in a row"),
    ({"id": "e", "image": "images/0.png", "conversations": [{"from": "human", "value": "What?"}, GPT]},
     "id 'e'\\) has an image and no <image>"),
    ({"id": "f", "image": "images/0.png", "conversations": [HUMAN]}, "id 'f'\\).*ends with a human turn"),
    ({"id": "g", "image": "images/0.png", "conversations": [HUMAN, {"from": "bot", "value": "x"}]},
     "id 'g'\\): turn 1 needs 'from'"),
    ({"image": "images/0.png"}, "sample 0 is not an object with a 'conversations' list"),
])
def test_bad_samples_are_named(world, tmp_path, entry, message):
    with pytest.raises(InputError, match=message):
        read_llava_json(_write(tmp_path, [entry]), world)


def test_bad_files_and_missing_images(world, tmp_path):
    good = {"id": "ok", "image": "images/0.png", "conversations": [HUMAN, GPT]}
    lost = {"id": "lost", "image": "images/missing.png", "conversations": [HUMAN, GPT]}
    samples, skipped = read_llava_json(_write(tmp_path, [good, lost, lost]), world)
    assert [s.id for s in samples] == ["ok"] and skipped == {"missing image": 2}
    with pytest.raises(InputError, match="no usable samples \\(2 missing image skipped\\)"):
        read_llava_json(_write(tmp_path, [lost, lost]), world)
    with pytest.raises(InputError, match="must hold a JSON list"):
        read_llava_json(_write(tmp_path, {"conversations": []}), world)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InputError, match="broken.json is not valid JSON"):
        read_llava_json(tmp_path / "broken.json", world)
    with pytest.raises(InputError, match="LLaVA data file not found"):
        read_llava_json(tmp_path / "absent.json", world)


def test_long_samples_are_truncated_and_counted(processor, world):
    samples, _ = read_llava_json(world / "finetune.json", world)
    full = LlavaDataset(samples, processor, vicuna_v1(""), max_length=512)[0]
    short = LlavaDataset(samples, processor, vicuna_v1(""), max_length=40)
    item = short[0]
    assert not full["truncated"] and item["truncated"]
    assert item["input_ids"].tolist() == full["input_ids"][:40].tolist()
    assert item["labels"].tolist() == full["labels"][:40].tolist()
    assert LlavaCollator(processor.tokenizer.pad_token_id)([item, short[1]])["truncated"] == 2
    with pytest.raises(InputError, match="sample f0: its image ends past model_max_length 40"):
        LlavaDataset(samples, processor, vicuna_v1(), max_length=40)[0]  # the long system line pushes it out
    with pytest.raises(InputError, match="model_max_length 16 leaves no room"):
        LlavaDataset(samples, processor, vicuna_v1(), max_length=16)


def test_collator_pads_and_stacks_the_images_it_has(processor, world):
    samples, _ = read_llava_json(world / "finetune.json", world)
    dataset = LlavaDataset(samples, processor, vicuna_v1(""), max_length=512)
    items = [dataset[0], dataset[8]]  # an image sample and the text-only one
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert batch["truncated"] == 0


def test_sampler_groups_batches_by_modality_and_length():
    has_image = [i % 3 != 0 for i in range(50)]  # 33 image samples, 17 text-only
    lengths = [(i * 37) % 101 for i in range(50)]
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, batches_per_group=2, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and len(sampler) == 50
    groups = [order[i:i + 8] for i in range(0, 50, 8)]
    whole = 33 // 8 + 17 // 8  # groups of one modality; the leftovers end the epoch, mixed
    for group in groups[:whole]:
        assert len({has_image[i] for i in group}) == 1
        first, second = sorted(lengths[i] for i in group[:4]), sorted(lengths[i] for i in group[4:])
        assert abs(sum(first) - sum(second)) <= max(first + second)  # long and short dealt to both batches
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
