"""Stage 1a: masked next-token prediction (MNTP) with LoRA on a bidirectional decoder (LLM2Vec).

A fraction of the tokens is replaced by a mask token; attention is bidirectional, and the hidden
state of the token *before* each masked position predicts it. That is exactly the causal-LM loss
(which shifts labels by one) with labels kept only at masked positions.

Outputs under `out_dir`:
    adapter/      the LoRA adapter on the base transformer, llm2vec's MNTP layout
    merged/       base + adapter merged: a full encoder directory (llm2vec_config.json included)
    checkpoints/  Trainer checkpoints (adapter only), used to resume
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader, Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    default_data_collator,
    set_seed,
)

from llm2clip.config import config_to_dict
from llm2clip.data.records import read_corpus
from llm2clip.errors import InputError
from llm2clip.fileio import atomic_write_json
from llm2clip.rerun import finished_run, total_runtime
from llm2clip.sampling import ItemKey, SeededShuffle, item_generator, train_dataloader
from llm2clip.text.encoder import LLMEncoder, check_supported_model_dir
from llm2clip.training import LoraSettings, TrainSettings, loss_curve, resume_checkpoint, training_arguments

logger = logging.getLogger(__name__)

REPORT = "mntp_report.json"

# llm2vec's mask token choices: "blank" is "_" (its default), "eos" is the tokenizer's eos token.
MASK_TOKENS = {"blank": "_", "eos": None}


@dataclass
class MNTPConfig:
    model: Path = Path("runs/tiny-llm")
    corpus: Path = Path("runs/world/corpus.txt")
    out_dir: Path = Path("runs/stage1/mntp")
    mask_ratio: float = 0.2
    mask_token: str = "blank"  # blank | eos
    max_seq_length: int = 128
    max_lines: int | None = None  # use only the first N corpus lines
    pooling_mode: str = "mean"  # written to the merged encoder's llm2vec_config.json
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(max_steps=100, batch_size=16, learning_rate=5e-4, save_steps=25)
    )


def mask_token_id(tokenizer: PreTrainedTokenizerBase, choice: str) -> int:
    if choice not in MASK_TOKENS:
        raise InputError(f"mask_token must be one of {', '.join(MASK_TOKENS)}; got {choice!r}")
    if choice == "eos":
        return tokenizer.eos_token_id
    ids = tokenizer(MASK_TOKENS[choice], add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"the tokenizer splits the mask token {MASK_TOKENS[choice]!r} into {len(ids)} tokens")
    return ids[0]


class MaskedBlocks(Dataset):
    """Item (epoch, i) is token block i with `mask_ratio` of its non-special tokens masked, the mask drawn
    from (seed, epoch, i); labels stay only at masked positions."""

    def __init__(self, blocks: datasets.Dataset, mask_token_id: int, mask_ratio: float,
                 special_token_ids: list[int], seed: int):
        self.blocks = blocks
        self.mask_token_id = mask_token_id
        self.mask_ratio = mask_ratio
        self.special_token_ids = torch.tensor(special_token_ids)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: ItemKey) -> dict[str, torch.Tensor]:
        epoch, index = key
        input_ids = torch.tensor(self.blocks[index]["input_ids"])
        draws = torch.rand(input_ids.shape, generator=item_generator(self.seed, epoch, index))
        masked = (draws < self.mask_ratio) & ~torch.isin(input_ids, self.special_token_ids)
        return {
            "input_ids": input_ids.masked_fill(masked, self.mask_token_id),
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.masked_fill(~masked, -100),
        }


class MNTPTrainer(Trainer):
    """The Trainer, with the blocks in a seeded order whose (epoch, index) keys also seed the masks."""

    def get_train_dataloader(self) -> DataLoader:
        return train_dataloader(self, SeededShuffle(len(self.train_dataset), self.args.seed))


def corpus_blocks(tokenizer: PreTrainedTokenizerBase, lines: list[str], block_size: int) -> datasets.Dataset:
    """Tokenise the lines (each with BOS) and pack them into blocks of `block_size` tokens."""

    def pack(batch: dict) -> dict:
        ids = [token for line in batch["input_ids"] for token in line]
        usable = len(ids) // block_size * block_size
        return {"input_ids": [ids[i : i + block_size] for i in range(0, usable, block_size)]}

    # verbose=False: a line longer than the model is no error here, `pack` cuts the stream into blocks.
    tokens = datasets.Dataset.from_dict({"text": lines}).map(
        lambda batch: tokenizer(batch["text"], verbose=False), batched=True, remove_columns=["text"]
    )
    blocks = tokens.map(pack, batched=True, batch_size=2000, remove_columns=tokens.column_names)
    if len(blocks) == 0:
        raise InputError(f"the corpus has fewer than {block_size} tokens; lower max_seq_length or add text")
    return blocks


def lora_config(lora: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), bias="none"
    )


def export_mntp(peft_lm: PeftModel, tokenizer, config: MNTPConfig) -> None:
    """Write the adapter for the base transformer (llm2vec layout) and the merged encoder."""
    # The adapter was trained on the causal LM; llm2vec's adapter sits on the base model (no lm head).
    lora_state = get_peft_model_state_dict(peft_lm)
    lm = peft_lm.unload()
    del lm.config.is_causal
    base = get_peft_model(lm.model, lora_config(config.lora))
    base_state = {key.replace("base_model.model.model.", "base_model.model.", 1): v for key, v in lora_state.items()}
    result = set_peft_model_state_dict(base, base_state)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter keys did not map onto the base model: {result.unexpected_keys[:3]}")
    base.peft_config["default"].base_model_name_or_path = str(config.model.resolve())
    # The block length is a training setting; the saved encoder keeps llm2vec's default max_length.
    encoder = LLMEncoder(base, tokenizer, pooling_mode=config.pooling_mode)
    encoder.save_pretrained(config.out_dir / "adapter", merge=False)
    encoder.save_pretrained(config.out_dir / "merged", merge=True)


def train_mntp(config: MNTPConfig) -> dict:
    out = Path(config.out_dir)
    finished = finished_run("stage1 mntp", out, out / REPORT, [out / "adapter", out / "merged"], config_to_dict(config))
    if finished is not None:
        return finished
    check_supported_model_dir(config.model)
    if not 0.0 < config.mask_ratio < 1.0:
        raise InputError(f"mask_ratio must be in (0, 1); got {config.mask_ratio}")
    lines = read_corpus(config.corpus)[: config.max_lines]
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks = MaskedBlocks(corpus_blocks(tokenizer, lines, config.max_seq_length),
                          mask_token_id(tokenizer, config.mask_token), config.mask_ratio,
                          list(tokenizer.all_special_ids), seed=config.train.seed)

    lm = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    lm.config.is_causal = False  # bidirectional attention through transformers' own masking
    set_seed(config.train.seed)  # the LoRA's random initialisation
    model = get_peft_model(lm, lora_config(config.lora))
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    model.print_trainable_parameters()

    checkpoint_dir = config.out_dir / "checkpoints"
    args = training_arguments(config.train, checkpoint_dir)
    trainer = MNTPTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    resume_from = resume_checkpoint(config.train, checkpoint_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)

    export_mntp(model, tokenizer, config)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "config": config_to_dict(config),
        "blocks": len(blocks),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_curve": loss_curve(trainer.state.log_history),
        "train_runtime_s": total_runtime(result.metrics["train_runtime"], out / REPORT, resumed=resume_from is not None),
    }
    atomic_write_json(out / REPORT, report)
    print(f"MNTP: {report['steps']} steps, loss {report['first_loss']} -> {report['last_loss']}")
    print(f"wrote {config.out_dir / 'adapter'} and {config.out_dir / 'merged'}")
    return report
