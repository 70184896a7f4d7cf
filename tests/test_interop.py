"""`llm2clip convert` and `export`: tiny random checkpoints in each official layout, checked against
reference computations written here from the layouts' descriptions (plain torch on the state dicts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_mllm_data import CORPUS, make_llm
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

from llm2clip import cli
from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip.errors import InputError
from llm2clip.interop.convert import ConvertConfig, convert
from llm2clip.interop.export import ExportConfig, export
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.tokenizer_training import train_tokenizer
from mllm.builder import BuildSettings, build_llava

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, LAYERS, HEADS, PATCH, IMAGE, MLP = 32, 2, 4, 8, 32, 64  # the tiny ViT
EMBED, HIDDEN, DEPTH, PROJ = 24, 48, 2, 16  # the tiny adapter: D, H, N blocks, P
LOGIT_SCALE = 4.2


def _rand(*shape: int, generator: torch.Generator, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def _norm(dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _rand(dim, generator=generator, scale=0.1), _rand(dim, generator=generator, scale=0.1)


def _reference_vit(seed: int) -> dict:
    """The tower's parameters by role; the fixtures lay them out under each layout's names."""
    g = torch.Generator().manual_seed(seed)
    blocks = [{
        "ln1": _norm(WIDTH, g), "qkv_w": _rand(3 * WIDTH, WIDTH, generator=g), "qkv_b": _rand(3 * WIDTH, generator=g),
        "out_w": _rand(WIDTH, WIDTH, generator=g), "out_b": _rand(WIDTH, generator=g), "ln2": _norm(WIDTH, g),
        "fc1_w": _rand(MLP, WIDTH, generator=g), "fc1_b": _rand(MLP, generator=g),
        "fc2_w": _rand(WIDTH, MLP, generator=g), "fc2_b": _rand(WIDTH, generator=g),
    } for _ in range(LAYERS)]
    return {"conv": _rand(WIDTH, 3, PATCH, PATCH, generator=g), "cls": _rand(WIDTH, generator=g),
            "pos": _rand((IMAGE // PATCH) ** 2 + 1, WIDTH, generator=g), "ln_pre": _norm(WIDTH, g),
            "blocks": blocks, "ln_post": _norm(WIDTH, g), "proj": _rand(WIDTH, PROJ, generator=g)}


def _reference_adapter(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    blocks = [{"ln": _norm(EMBED, g), "fc1": (_rand(HIDDEN, EMBED, generator=g), _rand(HIDDEN, generator=g)),
               "fc2": (_rand(EMBED, HIDDEN, generator=g), _rand(EMBED, generator=g))} for _ in range(DEPTH)]
    return {"blocks": blocks, "ln": _norm(EMBED, g), "proj": (_rand(PROJ, EMBED, generator=g), _rand(PROJ, generator=g))}


def vit_features(p: dict, pixels: torch.Tensor) -> torch.Tensor:
    """A CLIP ViT: patches + class token + positions, pre-LN, pre-LN blocks (QuickGELU), post-LN CLS, projection."""
    x = F.conv2d(pixels, p["conv"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([p["cls"].expand(x.shape[0], 1, WIDTH), x], dim=1) + p["pos"]
    x = F.layer_norm(x, (WIDTH,), *p["ln_pre"])
    for b in p["blocks"]:
        q, k, v = (F.layer_norm(x, (WIDTH,), *b["ln1"]) @ b["qkv_w"].T + b["qkv_b"]).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / (WIDTH // HEADS) ** 0.5, dim=-1) @ v
        x = x + attention.transpose(1, 2).flatten(2) @ b["out_w"].T + b["out_b"]
        h = F.layer_norm(x, (WIDTH,), *b["ln2"]) @ b["fc1_w"].T + b["fc1_b"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ b["fc2_w"].T + b["fc2_b"]
    return F.layer_norm(x[:, 0], (WIDTH,), *p["ln_post"]) @ p["proj"]


def adapter_features(a: dict, embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's adapter: L2 norm, blocks x + fc2(gelu(fc1(ln(x)))), LayerNorm, Linear with bias."""
    x = F.normalize(embeddings, dim=-1)
    for b in a["blocks"]:
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (EMBED,), *b["ln"]), *b["fc1"])), *b["fc2"])
    return F.linear(F.layer_norm(x, (EMBED,), *a["ln"]), *a["proj"])


def _hf_vision_names(p: dict) -> dict[str, torch.Tensor]:
    state = {"vision_model.embeddings.class_embedding": p["cls"],
             "vision_model.embeddings.patch_embedding.weight": p["conv"],
             "vision_model.embeddings.position_embedding.weight": p["pos"]}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        state[f"vision_model.{theirs}.weight"], state[f"vision_model.{theirs}.bias"] = p[ours]
    for i, b in enumerate(p["blocks"]):
        pre = f"vision_model.encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b["qkv_w"].chunk(3), b["qkv_b"].chunk(3)):
            state[f"{pre}self_attn.{name}.weight"], state[f"{pre}self_attn.{name}.bias"] = w, bias
        state[f"{pre}self_attn.out_proj.weight"], state[f"{pre}self_attn.out_proj.bias"] = b["out_w"], b["out_b"]
        state[f"{pre}layer_norm1.weight"], state[f"{pre}layer_norm1.bias"] = b["ln1"]
        state[f"{pre}layer_norm2.weight"], state[f"{pre}layer_norm2.bias"] = b["ln2"]
        state[f"{pre}mlp.fc1.weight"], state[f"{pre}mlp.fc1.bias"] = b["fc1_w"], b["fc1_b"]
        state[f"{pre}mlp.fc2.weight"], state[f"{pre}mlp.fc2.bias"] = b["fc2_w"], b["fc2_b"]
    state["visual_projection.weight"] = p["proj"].T
    return state


def _open_clip_names(p: dict, prefix: str) -> dict[str, torch.Tensor]:
    state = {"class_embedding": p["cls"], "conv1.weight": p["conv"], "positional_embedding": p["pos"],
             "proj": p["proj"]}
    state["ln_pre.weight"], state["ln_pre.bias"] = p["ln_pre"]
    state["ln_post.weight"], state["ln_post.bias"] = p["ln_post"]
    for i, b in enumerate(p["blocks"]):
        pre = f"transformer.resblocks.{i}."
        state[f"{pre}attn.in_proj_weight"], state[f"{pre}attn.in_proj_bias"] = b["qkv_w"], b["qkv_b"]
        state[f"{pre}attn.out_proj.weight"], state[f"{pre}attn.out_proj.bias"] = b["out_w"], b["out_b"]
        state[f"{pre}ln_1.weight"], state[f"{pre}ln_1.bias"] = b["ln1"]
        state[f"{pre}ln_2.weight"], state[f"{pre}ln_2.bias"] = b["ln2"]
        state[f"{pre}mlp.c_fc.weight"], state[f"{pre}mlp.c_fc.bias"] = b["fc1_w"], b["fc1_b"]
        state[f"{pre}mlp.c_proj.weight"], state[f"{pre}mlp.c_proj.bias"] = b["fc2_w"], b["fc2_b"]
    return {prefix + key: value for key, value in state.items()}


# Two namings of the same adapter: structure decides, not names.
ADAPTER_NAMINGS = {
    "fn_ln": lambda i: (f"{i}.ln", f"{i}.fn.0", f"{i}.fn.3"),
    "blocks": lambda i: (f"blocks.{i}.norm", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"),
}
ADAPTER_TAILS = {"fn_ln": (f"{DEPTH}", f"{DEPTH + 1}"), "blocks": ("final_norm", "head")}


def _adapter_names(a: dict, prefix: str, naming: str) -> dict[str, torch.Tensor]:
    state = {}
    for i, b in enumerate(a["blocks"]):
        for name, (w, bias) in zip(ADAPTER_NAMINGS[naming](i), (b["ln"], b["fc1"], b["fc2"])):
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = w, bias
    norm, proj = ADAPTER_TAILS[naming]
    state[f"{prefix}{norm}.weight"], state[f"{prefix}{norm}.bias"] = a["ln"]
    state[f"{prefix}{proj}.weight"], state[f"{prefix}{proj}.bias"] = a["proj"]
    return state


def write_hf_release(out: Path, naming: str = "blocks", extra: dict | None = None) -> Path:
    """The microsoft/LLM2CLIP-Openai-* layout: a CLIPConfig with remote code, one model.safetensors."""
    out.mkdir(parents=True)
    vision_config = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH).to_dict()
    config = {"model_type": "clip", "architectures": ["LLM2CLIPModel"], "projection_dim": PROJ,
              "logit_scale_init_value": 2.6592, "vision_config": vision_config,
              "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_llm2clip.LLM2CLIPModel"}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_clip.py").write_text("import transformers.onnx  # fails under transformers 5\n")
    state = {**_hf_vision_names(_reference_vit(0)), **_adapter_names(_reference_adapter(1), "text_adapter.", naming),
             "logit_scale": torch.tensor(LOGIT_SCALE), **(extra or {})}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    return out


def write_eva_checkpoint(path: Path, visual: dict | None = None) -> Path:
    """LLM2CLIP's GitHub training checkpoint (EVA-CLIP style, DDP-wrapped): visual.*, text.text_adaptor.*."""
    state = {**(visual if visual is not None else _open_clip_names(_reference_vit(2), "visual.")),
             **_adapter_names(_reference_adapter(3), "text.text_adaptor.", "fn_ln"),
             "logit_scale": torch.tensor([LOGIT_SCALE])}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(3, 3, IMAGE, IMAGE, generator=g), torch.randn(3, EMBED, generator=g)


def _check_features(model_dir: Path, vit: dict, adapter: dict) -> LLM2CLIPModel:
    model = LLM2CLIPModel.from_pretrained(model_dir).eval()
    pixels, embeddings = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixels), vit_features(vit, pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.get_text_features(embeddings), adapter_features(adapter, embeddings),
                                   atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    return model


@pytest.mark.parametrize("naming", sorted(ADAPTER_NAMINGS))
def test_hf_release_converts_to_equal_features(tmp_path, naming):
    release = write_hf_release(tmp_path / "release", naming)
    out = convert(ConvertConfig(source="hf_release", checkpoint=release, out_dir=tmp_path / "converted"))
    model = _check_features(out, _reference_vit(0), _reference_adapter(1))
    config = model.config
    assert (config.text_embed_dim, config.adapter_hidden_dim, config.adapter_depth, config.projection_dim) == (
        EMBED, HIDDEN, DEPTH, PROJ)
    assert config.adapter_input_l2norm and config.text_projection_bias
    assert not list(out.glob("*.py"))  # no remote code travels with it


def test_eva_checkpoint_converts_to_equal_features(tmp_path):
    path = write_eva_checkpoint(tmp_path / "epoch_3.pt")
    out = convert(ConvertConfig(source="eva_checkpoint", checkpoint=path, out_dir=tmp_path / "converted",
                                head_width=WIDTH // HEADS))
    _check_features(out, _reference_vit(2), _reference_adapter(3))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted")
    return convert(ConvertConfig(source="hf_release", checkpoint=write_hf_release(root / "release"),
                                 out_dir=root / "llm2clip"))


def test_open_clip_export_round_trip(converted, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    out = export(ExportConfig(model=converted, format="open_clip", out_dir=tmp_path / "open_clip"))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")  # strict load
    pixels, _ = _inputs()
    ours = LLM2CLIPModel.from_pretrained(converted).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(pixels), ours.get_image_features(pixels),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels), vit_features(_reference_vit(0), pixels),
                                   atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    assert preprocess.transforms[0].size == IMAGE  # resize of the shortest side, then crop


def test_converted_tower_follows_llava_loader_conventions_and_goes_into_mllm(converted, tmp_path):
    """LLaVA-1.5's CLIPVisionTower: from_pretrained on mm_vision_tower, hidden_states[-2], drop CLS."""
    tower_dir = export(ExportConfig(model=converted, format="clip_vision", out_dir=tmp_path / "tower"))
    processor, tower = CLIPImageProcessor.from_pretrained(tower_dir), CLIPVisionModel.from_pretrained(tower_dir)
    assert processor.crop_size == {"height": IMAGE, "width": IMAGE}
    pixels, _ = _inputs()
    with torch.no_grad():
        llava_features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert llava_features.shape == (3, (IMAGE // PATCH) ** 2, WIDTH)

    model, _ = build_llava(BuildSettings(vision_tower=tower_dir, llm=make_llm(tmp_path / "llm")))
    with torch.no_grad():
        ours = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        expected = model.model.multi_modal_projector(llava_features)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def write_llm2vec_release(out: Path, prefix: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned: a merged Llama with remote code, any key prefix."""
    out.mkdir(parents=True)
    tokenizer = train_tokenizer(CORPUS * 4, vocab_size=300, model_max_length=512)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4)
    state = LlamaModel(config).state_dict()
    saved = {prefix + key: value for key, value in state.items()}
    saved["lm_head.weight"] = torch.randn(len(tokenizer), 32)
    save_file(saved, out / "model.safetensors")
    remote = {**config.to_dict(), "architectures": ["LlamaEncoderModel"],
              "auto_map": {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"}}
    (out / "config.json").write_text(json.dumps(remote))
    (out / "modeling_llama_encoder.py").write_text("raise ImportError('remote code must not run')\n")
    return out, state


@pytest.mark.parametrize("prefix", ["", "model.", "llama.encoder."])
def test_llm2vec_release_loads_natively_with_the_model_card_settings(tmp_path, prefix):
    release, state = write_llm2vec_release(tmp_path / "release", prefix)
    out = convert(ConvertConfig(source="llm2vec_encoder", checkpoint=release, out_dir=tmp_path / "encoder"))
    encoder = LLMEncoder.from_pretrained(out, device="cpu")
    assert (encoder.pooling_mode, encoder.max_length, encoder.doc_max_length) == ("mean", 512, 512)

    text = "a red circle left of a blue square"
    reference = LlamaModel(LlamaConfig(**{k: v for k, v in json.loads((release / "config.json").read_text()).items()
                                          if k not in ("auto_map", "architectures")})).eval()
    reference.load_state_dict(state)
    tokenizer = encoder.tokenizer
    prompt = f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"  # Llama-3-Instruct, as the card
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    pooled = len(tokenizer(f"{text}<|eot_id|>", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hidden = reference(input_ids=ids, is_causal=False).last_hidden_state[0]
    torch.testing.assert_close(encoder.encode([text], show_progress=False)[0], hidden[-pooled:].mean(0),
                               atol=1e-5, rtol=0)


def test_unknown_layouts_are_refused(tmp_path, converted):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {}}))
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4), "text_model.x.weight": torch.zeros(2, 2)},
              plain / "model.safetensors")
    with pytest.raises(InputError, match="no text_adapter"):
        convert(ConvertConfig(source="hf_release", checkpoint=plain, out_dir=tmp_path / "a"))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(InputError, match=r"no text\.text_adaptor"):
        convert(ConvertConfig(source="eva_checkpoint", checkpoint=other, out_dir=tmp_path / "b"))
    extra = write_hf_release(tmp_path / "extra", extra={"text_model.embeddings.weight": torch.zeros(3, 3)})
    with pytest.raises(InputError, match=r"unexpected keys \['text_model.embeddings.weight'\]"):
        convert(ConvertConfig(source="hf_release", checkpoint=extra, out_dir=tmp_path / "c"))


def test_eva02_tower_is_refused_with_a_pointer_to_open_clip(tmp_path):
    eva02 = {"visual.patch_embed.proj.weight": torch.zeros(WIDTH, 3, PATCH, PATCH),
             "visual.blocks.0.attn.q_proj.weight": torch.zeros(WIDTH, WIDTH), "visual.rope.freqs_cos": torch.zeros(4)}
    path = write_eva_checkpoint(tmp_path / "eva02.pt", visual=eva02)
    with pytest.raises(InputError, match="EVA02 tower needs open_clip"):
        convert(ConvertConfig(source="eva_checkpoint", checkpoint=path, out_dir=tmp_path / "out"))


def test_adapter_of_other_shapes_is_refused_with_the_unmatched_keys(tmp_path):
    bad = write_hf_release(tmp_path / "bad", extra={"text_adapter.blocks.1.mlp.fc2.weight": torch.zeros(EMBED + 1, HIDDEN)})
    with pytest.raises(InputError) as err:
        convert(ConvertConfig(source="hf_release", checkpoint=bad, out_dir=tmp_path / "out"))
    message = str(err.value)
    assert "keys not matched" in message
    assert f"blocks.1.mlp.fc2.weight ({EMBED + 1}, {HIDDEN})" in message and "blocks.0." not in message


def test_encoder_of_another_hidden_size_is_refused(tmp_path, encoder_dir):
    release = write_hf_release(tmp_path / "release")
    with pytest.raises(InputError, match=f"hidden size 32, but the text adapter .* takes {EMBED}-dim"):
        convert(ConvertConfig(source="hf_release", checkpoint=release, out_dir=tmp_path / "out", encoder=encoder_dir))


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["convert", "--source", "hf_release", "--checkpoint", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.strip() == f"llm2clip convert: error: checkpoint not found: {tmp_path / 'absent'}"


def test_paper_adapter_has_273_8m_parameters_on_meta():
    config = LLM2CLIPConfig(vision_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1},
                            text_embed_dim=4096, adapter_hidden_dim=8192, adapter_depth=4, projection_dim=1280,
                            adapter_input_l2norm=True, text_projection_bias=True)
    with torch.device("meta"):
        model = LLM2CLIPModel(config)
    text_side = [*model.text_adapter.parameters(), *model.text_projection.parameters()]
    assert sum(p.numel() for p in text_side) == 273_769_728
    with torch.device("meta"):  # the default stays as it was: no input norm, no projection bias
        default = LLM2CLIPModel(LLM2CLIPConfig(vision_config=config.vision_config.to_dict()))
    assert default.text_projection.bias is None and not default.text_adapter.input_l2norm
