import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, CLIPConfig, CLIPModel

from llm2clip.clip import LLM2CLIPConfig, LLM2CLIPModel, export_vision_tower
from llm2clip.errors import InputError
from llm2clip.losses import SigLipLoss

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8}
TINY = {"text_embed_dim": 24, "adapter_hidden_dim": 48, "adapter_depth": 2, "projection_dim": 16}


def tiny_model(**overrides) -> LLM2CLIPModel:
    torch.manual_seed(0)
    return LLM2CLIPModel(LLM2CLIPConfig(vision_config=TINY_VISION, **{**TINY, **overrides})).eval()


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randn(batch, 24, generator=generator)


def test_feature_and_output_shapes():
    model = tiny_model()
    pixels, embeddings = inputs()
    assert model.get_image_features(pixels).shape == (3, 16)
    assert model.get_text_features(embeddings).shape == (3, 16)
    out = model(pixels, embeddings, return_loss=True)
    assert out.logits_per_image.shape == out.logits_per_text.shape == (3, 3)
    assert torch.allclose(out.logits_per_image, out.logits_per_text.T)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3))
    assert torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(3))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model(pixels, embeddings).loss is None


def test_text_features_accept_fp16_cache_rows():
    model = tiny_model()
    _, embeddings = inputs()
    half = model.get_text_features(embeddings.half())
    assert half.dtype == torch.float32
    assert torch.allclose(half, model.get_text_features(embeddings.half().float()))


def test_wrong_text_dim_names_both_numbers():
    model = tiny_model()
    with pytest.raises(InputError, match=r"dimension 23 .* expects 24"):
        model.get_text_features(torch.randn(2, 23))


def test_loss_needs_as_many_images_as_captions():
    model = tiny_model()
    pixels, embeddings = inputs()
    with pytest.raises(InputError, match="3 images and 2 caption"):
        model(pixels, embeddings[:2], return_loss=True)
    assert model(pixels, embeddings[:2]).logits_per_image.shape == (3, 2)  # retrieval scoring is fine


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    model = tiny_model()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert model.logit_bias is None
    pixels, embeddings = inputs()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(pixels, embeddings)
    assert torch.allclose(out.logits_per_text, 100 * out.text_embeds @ out.image_embeds.T, atol=1e-5)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)
    assert model.logit_scale.requires_grad


def test_siglip_model_has_a_bias_and_uses_the_sigmoid_loss():
    model = tiny_model(loss="siglip")
    assert model.logit_bias.item() == pytest.approx(-10.0)
    pixels, embeddings = inputs()
    out = model(pixels, embeddings, return_loss=True)
    scale = model.logit_scale.exp()
    expected = SigLipLoss()(out.image_embeds, out.text_embeds, scale, model.logit_bias)
    assert torch.allclose(out.loss, expected)
    assert torch.allclose(out.logits_per_text, scale * out.text_embeds @ out.image_embeds.T - 10.0, atol=1e-5)


@pytest.mark.parametrize("loss, scale, bias", [("clip", 1 / 0.07, None), ("siglip", 10.0, -10.0)])
def test_each_loss_starts_at_its_papers_scale_and_bias_and_a_checkpoint_keeps_them(tmp_path, loss, scale, bias):
    model = tiny_model(loss=loss)
    assert model.logit_scale.exp().item() == pytest.approx(scale, rel=1e-6)
    assert (model.logit_bias is None) if bias is None else model.logit_bias.item() == pytest.approx(bias)
    assert model.config.logit_scale_max == pytest.approx(math.log(100))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.logit_scale.item() == model.logit_scale.item()
    assert loaded.config.logit_scale_init_value == model.config.logit_scale_init_value
    assert (loaded.logit_bias is None) if bias is None else loaded.logit_bias.item() == model.logit_bias.item()


def test_save_and_auto_load_round_trip_in_safetensors(tmp_path):
    model = tiny_model(loss="siglip")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        model.logit_bias.fill_(-4.0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llm2clip" and "auto_map" not in config
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LLM2CLIPModel
    assert loaded.config.text_embed_dim == 24 and loaded.config.loss == "siglip"
    pixels, embeddings = inputs()
    with torch.no_grad():
        before, after = model(pixels, embeddings, return_loss=True), loaded(pixels, embeddings, return_loss=True)
    for name in ("logits_per_image", "image_embeds", "text_embeds", "loss"):
        assert torch.equal(before[name], after[name]), name
    assert loaded.logit_scale.item() == 3.0 and loaded.logit_bias.item() == -4.0


def test_whitening_applies_before_the_adapter_and_survives_save_and_load(tmp_path):
    model = tiny_model(adapter_whitening=True)
    _, embeddings = inputs()
    unwhitened = tiny_model()
    assert torch.equal(model.get_text_features(embeddings), unwhitened.get_text_features(embeddings))  # identity

    generator = torch.Generator().manual_seed(2)
    mean, matrix = torch.randn(24, generator=generator), torch.randn(24, 24, generator=generator)
    model.set_whitening(mean, matrix)
    expected = unwhitened.get_text_features((embeddings - mean) @ matrix)
    torch.testing.assert_close(model.get_text_features(embeddings), expected)

    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.adapter_whitening
    assert torch.equal(loaded.text_adapter.input_mean, mean)
    assert torch.equal(loaded.text_adapter.input_whitening, matrix)
    assert torch.equal(loaded.get_text_features(embeddings), model.get_text_features(embeddings))


def test_set_whitening_checks_the_model_and_the_shapes():
    with pytest.raises(InputError, match="built without adapter_whitening"):
        tiny_model().set_whitening(torch.zeros(24), torch.eye(24))
    with pytest.raises(InputError, match=r"\(23,\) and \(24, 24\) does not fit text_embed_dim 24"):
        tiny_model(adapter_whitening=True).set_whitening(torch.zeros(23), torch.eye(24))


def _tiny_clip() -> CLIPModel:
    torch.manual_seed(2)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    return CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=text, projection_dim=8)).eval()


@pytest.mark.parametrize("layout", ["clip_model", "clip_vision_model"])
def test_vision_tower_loads_from_a_clip_checkpoint(tmp_path, layout):
    clip = _tiny_clip()
    (clip if layout == "clip_model" else clip.vision_model).save_pretrained(tmp_path)
    model = LLM2CLIPModel.from_vision_pretrained(tmp_path, **TINY).eval()
    assert model.config.vision_config.hidden_size == 32 and model.config.text_embed_dim == 24
    pixels, _ = inputs()
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).pooler_output
        got = model.vision_model(pixel_values=pixels).pooler_output
    assert torch.equal(got, expected)
    assert model.get_image_features(pixels).shape == (3, 16)


def test_from_vision_pretrained_refuses_what_is_not_clip(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        LLM2CLIPModel.from_vision_pretrained(tmp_path, **TINY)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="'llama'"):
        LLM2CLIPModel.from_vision_pretrained(tmp_path, **TINY)


EXPORT_CHECK = """
import sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPVisionModel

out_dir, pixels_file, result_file = sys.argv[1:]
tower = CLIPVisionModel.from_pretrained(out_dir).eval()
processor = AutoImageProcessor.from_pretrained(out_dir)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
assert tuple(processor(images=image, return_tensors="pt").pixel_values.shape) == (1, 3, 32, 32)
with torch.no_grad():
    pooled = tower(pixel_values=torch.from_numpy(np.load(pixels_file))).pooler_output
np.save(result_file, pooled.numpy())
assert not [name for name in sys.modules if name.startswith("llm2clip")]
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (several seconds)
def test_exported_tower_loads_as_plain_clip_in_a_fresh_process(tmp_path):
    model = tiny_model()
    out_dir = tmp_path / "tower"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("replaced by the export")
    assert export_vision_tower(model, out_dir) == out_dir
    assert not (out_dir / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower"]  # no temporary directories left
    processor = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 32}
    assert processor["crop_size"] == {"height": 32, "width": 32}
    assert processor["do_center_crop"] and processor["image_mean"][0] == pytest.approx(0.48145466)
    pixels, _ = inputs()
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(out_dir), str(tmp_path / "pixels.npy"), str(tmp_path / "out.npy")],
        check=True, cwd=tmp_path, timeout=120,
    )
    with torch.no_grad():
        expected = model.vision_model(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_export_resize_size_must_cover_the_crop(tmp_path):
    model = tiny_model()
    export_vision_tower(model, tmp_path / "tower", image_size=36)
    processor = json.loads((tmp_path / "tower" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 36} and processor["crop_size"]["height"] == 32
    with pytest.raises(InputError, match="below the tower's input size 32"):
        export_vision_tower(model, tmp_path / "small", image_size=28)


def _trainable(model: LLM2CLIPModel) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("unlocked", "vision_trainable"),
    [
        (0, set()),
        (1, {"post_layernorm", "visual_projection"}),
        (2, {"post_layernorm", "visual_projection", "layers.1"}),
        (-1, {"post_layernorm", "visual_projection", "layers.1", "layers.0", "embeddings", "pre_layrnorm"}),
        (10, {"post_layernorm", "visual_projection", "layers.1", "layers.0", "embeddings", "pre_layrnorm"}),
    ],
)
def test_lock_vision_layers_keeps_the_last_groups_trainable(unlocked, vision_trainable):
    model = tiny_model()
    model.lock_vision_layers(0)
    model.lock_vision_layers(unlocked)  # a second call may unlock again
    trainable = _trainable(model)
    everything = {name for name, _ in model.named_parameters()}
    vision = {n for n in everything if n.startswith(("vision_model.", "visual_projection."))}
    assert everything - vision <= trainable  # text adapter, text projection and logit scale stay trainable
    expected = {n for n in vision if any(f".{part}." in f".{n}" for part in vision_trainable)}
    assert trainable & vision == expected


def test_lock_vision_layers_rejects_below_minus_one():
    with pytest.raises(InputError, match="-2"):
        tiny_model().lock_vision_layers(-2)


def test_gradient_checkpointing_reaches_the_vision_layers_and_keeps_gradients():
    model = tiny_model().train()
    reference = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    layers = model.vision_model.encoder.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    pixels, embeddings = inputs()
    for m in (model, reference):
        m(pixels, embeddings, return_loss=True).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
