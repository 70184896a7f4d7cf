"""Stage-2 training samples/s, side by side: ours over cached LLM embeddings, ours with the LLM run online, open_clip.

    python bench/stage2_throughput.py [--batch 128] [--steps 2] [--rounds 5] [--threads 2] [--encoder DIR]
                                      [--image-size 64] [--text-layers 12]

All three train the same ViT (the Stage2Config vision sizes) on the same batch and image size, in
fp32, on synthetic in-memory data, so the numbers measure compute and not disk:
  ours, cache   one Stage2Trainer optimizer step as its training loop runs it (training_step, i.e.
                compute_loss and backward; gradient clipping; AdamW; scheduler; logit-scale clamp),
                over random fp16 embeddings of the encoder's width;
  ours, online  the same step, after the frozen LLMEncoder embeds the batch's captions (half short,
                half long world captions) under no_grad;
  open_clip     open_clip.CLIP with its own text tower (CLIPTextCfg defaults at the ViT's width),
                open_clip.ClipLoss and AdamW as open_clip's training script sets them up.
After warm-up steps, each round times `--steps` steps of each configuration in turn, so machine noise
hits all three alike. Prints the median samples/s over rounds and the ratios.

OpenMP threads wait passively unless OMP_WAIT_POLICY says otherwise. With the default policy, on the
shared 2-core machine, every op split over 2 threads cost about 8 ms while other processes held the
cores (a 1M-element mul_: 8 ms, against 0.1 ms passive or on 1 thread), which buried the compute.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn
from transformers import AutoModel, LlamaConfig

from llm2clip.data.synth import SynthConfig, sample_split
from llm2clip.data.vocabulary import long_caption, short_captions
from llm2clip.losses import stage2_loss
from llm2clip.stage2.train import ClampLogitScale, Stage2Config, Stage2Trainer, build_model
from llm2clip.text.encoder import LLMEncoder
from llm2clip.text.tokenizer_training import train_tokenizer
from llm2clip.training import training_arguments
from table import Ratio

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = [ROOT / "runs/stage1/contrastive/merged", ROOT / "runs/tiny-llm"]
Step = Callable[[], None]


def world_captions(n: int) -> list[str]:
    """n captions of the synthetic world's train split: short and long ones in turn (the default caption mix)."""
    pictures = sample_split(SynthConfig(), "train", n)
    return [short_captions(p.scene, p.text_seed, 1)[0][0] if i % 2 == 0 else long_caption(p.scene, p.text_seed)[0]
            for i, p in enumerate(pictures)]


def load_encoder(path: Path | None, captions: list[str], tmp: Path) -> tuple[LLMEncoder, str]:
    """The encoder at `path`, else the first of ENCODERS on disk, else a random tiny-LLM-sized Llama."""
    path = path or next((p for p in ENCODERS if p.is_dir()), None)
    name = str(path) if path else "a random Llama"
    if path is None:
        tokenizer = train_tokenizer(captions, vocab_size=4096, model_max_length=1024)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        path = tmp / "random-llama"
        LLMEncoder(AutoModel.from_config(config), tokenizer).save_pretrained(path)
    encoder = LLMEncoder.from_pretrained(path, dtype="float32", device="cpu").eval()
    config = encoder.model.config
    return encoder, f"{name} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size})"


def ours(config: Stage2Config, dim: int, out: Path) -> tuple[Stage2Trainer, Callable[[dict], None]]:
    """The stage-2 Trainer, and one optimizer step on a batch as `Trainer._inner_training_loop` runs it."""
    model = build_model(config, dim, None)
    args = training_arguments(config.train, out, remove_unused_columns=False, dataloader_drop_last=True,
                              ddp_find_unused_parameters=False, disable_tqdm=True)
    loss = stage2_loss(config.loss)
    clamp = ClampLogitScale(loss.logit_scale_max)
    trainer = Stage2Trainer(model=model, args=args, loss=loss, callbacks=[clamp])
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(model, trainer.optimizer)
    trainer.create_scheduler(num_training_steps=config.train.max_steps)
    trainer.current_gradient_accumulation_steps = 1

    def step(batch: dict) -> None:
        trainer.training_step(model, dict(batch))
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        clamp.on_step_end(args, trainer.state, trainer.control, model=model)

    return trainer, step


def open_clip_model(config: Stage2Config, text_layers: int) -> tuple[open_clip.CLIP, CLIPTextCfg]:
    """open_clip's CLIP with our ViT's sizes, and its default text tower at the ViT's width (64-wide heads)."""
    vision = config.vision
    vision_cfg = CLIPVisionCfg(layers=vision.num_layers, width=vision.hidden_size,
                               head_width=vision.hidden_size // vision.num_heads,
                               mlp_ratio=vision.intermediate_size / vision.hidden_size, patch_size=vision.patch_size,
                               image_size=vision.image_size)
    text_cfg = CLIPTextCfg(width=vision.hidden_size, heads=max(vision.hidden_size // 64, 1), layers=text_layers)
    # quick_gelu: the activation of transformers' CLIPVisionConfig, which our tower uses.
    return open_clip.CLIP(config.projection_dim, vision_cfg, text_cfg, quick_gelu=True), text_cfg


def open_clip_step(model: open_clip.CLIP, config: Stage2Config, images: torch.Tensor, texts: torch.Tensor) -> Step:
    """One step of open_clip's train_one_epoch (fp32, one process, no gradient clipping: its defaults)."""
    exempt = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
              or "logit_scale" in n]
    exempt_ids = {id(p) for p in exempt}
    decayed = [p for p in model.parameters() if id(p) not in exempt_ids]
    optimizer = torch.optim.AdamW([{"params": exempt, "weight_decay": 0.0},
                                   {"params": decayed, "weight_decay": config.train.weight_decay}],
                                  lr=config.train.learning_rate, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss(cache_labels=True)

    def step() -> None:
        model.train()
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def random_tokens(batch: int, cfg: CLIPTextCfg) -> torch.Tensor:
    """[batch, context] ids padded with 0 after an end token (the largest id, where open_clip pools)."""
    lengths = torch.randint(8, cfg.context_length, (batch,))
    tokens = torch.randint(1, cfg.vocab_size - 1, (batch, cfg.context_length))
    tokens[torch.arange(cfg.context_length) > lengths[:, None]] = 0
    tokens[torch.arange(batch), lengths] = cfg.vocab_size - 1
    return tokens


def parameters(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable"


def time_rounds(steps: dict[str, Step], args: argparse.Namespace, batch: int) -> dict[str, list[float]]:
    """Samples/s of every step, round by round: each round runs `args.steps` steps of each in turn."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(batch * args.steps / (time.perf_counter() - start))
    return rates


def run(argv: list[str] | None = None) -> list[Ratio]:
    """Runs the bench as its command line `argv` says, prints its report and returns its ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config = Stage2Config()
    parser.add_argument("--batch", type=int, default=config.train.batch_size)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", type=Path, help="LLM encoder directory for the online configuration (default: "
                        "runs/stage1/contrastive/merged, else runs/tiny-llm, else a random tiny Llama)")
    parser.add_argument("--image-size", type=int, default=config.vision.image_size)
    parser.add_argument("--text-layers", type=int, default=CLIPTextCfg.layers, help="open_clip's text tower depth")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.rounds, args.threads, args.text_layers) < 1 or args.warmup < 0:
        parser.error("--batch, --steps, --rounds, --threads and --text-layers must be at least 1, --warmup 0 or more")
    vision = config.vision
    if args.image_size < vision.patch_size or args.image_size % vision.patch_size:
        parser.error(f"--image-size must be a multiple of the patch size {vision.patch_size}")
    torch.set_num_threads(args.threads)
    vision.image_size = args.image_size
    config.train.batch_size = args.batch

    torch.manual_seed(0)
    captions = world_captions(args.batch)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        encoder, encoder_name = load_encoder(args.encoder, captions, Path(tmp))
        dim = encoder.embedding_dim
        cached = torch.randn(args.batch, dim).half()
        trainer, step_cache = ours(config, dim, Path(tmp) / "cache")
        _, step_online = ours(config, dim, Path(tmp) / "online")
        clip, text_cfg = open_clip_model(config, args.text_layers)

        def online() -> None:
            with torch.no_grad():
                embeddings = encoder(encoder.tokenize(encoder.prepare_texts(captions)))
            step_online({"pixel_values": images, "llm_embeddings": embeddings})

        rates = time_rounds({
            "ours, cache": lambda: step_cache({"pixel_values": images, "llm_embeddings": cached}),
            "ours, LLM online": online,
            f"open_clip {open_clip.__version__}": open_clip_step(clip, config, images, random_tokens(args.batch, text_cfg)),
        }, args, args.batch)

    tokens = (args.image_size // vision.patch_size) ** 2 + 1
    features = encoder.tokenize(encoder.prepare_texts(captions))
    model = trainer.model
    print(f"stage-2 training step, fp32, {torch.get_num_threads()} thread(s) (OMP_WAIT_POLICY "
          f"{os.environ['OMP_WAIT_POLICY']}); batch {args.batch}, {args.image_size} px; median of {args.rounds} "
          f"round(s) of {args.steps} step(s) per configuration after {args.warmup} warm-up step(s)")
    print(f"ViT (all three): {vision.num_layers} layers, width {vision.hidden_size}, {vision.num_heads} heads, "
          f"MLP {vision.intermediate_size}, patch {vision.patch_size} ({tokens} tokens); projection "
          f"{config.projection_dim}")
    print(f"ours: LLM2CLIPModel (transformers CLIPVisionModel, {model.config.vision_config._attn_implementation} "
          f"attention) + adapter {config.adapter.depth} x {config.adapter.hidden_dim} over {dim}-dim embeddings, "
          f"{parameters(model)}; Stage2Trainer step with {trainer.args.optim.value}, max_grad_norm "
          f"{trainer.args.max_grad_norm}")
    print(f"ours, LLM online: {encoder_name} embeds the batch's captions under no_grad "
          f"({features['attention_mask'].sum(1).float().mean():.0f} tokens on average, "
          f"{features['input_ids'].shape[1]} padded)")
    print(f"open_clip: text tower {text_cfg.layers} layers (its default: {CLIPTextCfg.layers}), width {text_cfg.width}, "
          f"{text_cfg.heads} heads, {text_cfg.context_length} tokens, vocab {text_cfg.vocab_size}: open_clip's "
          f"CLIPTextCfg defaults at the ViT's width; {parameters(clip)}; AdamW (for-loop), no clipping")
    print(f"\n{'configuration':24s} {'samples/s':>10s}   per round")
    medians = {name: statistics.median(runs) for name, runs in rates.items()}
    for name, runs in rates.items():
        print(f"{name:24s} {medians[name]:10.1f}   {', '.join(f'{r:.1f}' for r in runs)}")
    cache, online_rate, theirs = medians.values()
    print(f"\nratio ours-cache / open_clip:   {cache / theirs:.2f}x")
    print(f"ratio ours-cache / ours-online: {cache / online_rate:.2f}x")
    bench = f"stage-2 step, {vision.num_layers}-layer ViT, batch {args.batch} (CPU)"
    return [Ratio(bench, "ours (cache) / open_clip", cache, theirs, "samples/s"),
            Ratio(bench, "ours (cache) / ours (LLM online)", cache, online_rate, "samples/s")]


if __name__ == "__main__":
    run()
