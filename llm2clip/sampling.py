"""Training data order and per-item draws that derive from (seed, epoch, index) alone, so a resumed run replays.

When the Trainer resumes mid-epoch it skips the trained batches without loading them, restores the global
RNG only after fetching its first batch, and DataLoader workers start from fresh seeds. A stateful
generator (a dataset's own `random.Random`, torch's global RNG in a collator or worker) therefore draws
differently after a resume than in the run that was never stopped. Here nothing carries state: a sampler
orders epoch `e` from (seed, e) and yields `(epoch, index)` keys, and the dataset draws whatever item
`index` needs (a caption, a mask) from `item_rng(seed, epoch, index)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer
from transformers.trainer_utils import seed_worker

ItemKey = tuple[int, int]  # (epoch, index): what a dataset here is indexed with


def item_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The draws for item `index` in `epoch`: the same in every run, process, worker and resume."""
    return random.Random(f"{seed}/{epoch}/{index}")  # str seeds hash with SHA-512, not Python's salted hash


def item_generator(seed: int, epoch: int, index: int | str) -> torch.Generator:
    """`item_rng` as a torch.Generator, for torch's sampling functions."""
    return torch.Generator().manual_seed(item_rng(seed, epoch, index).getrandbits(63))


class SeededShuffle(Sampler[ItemKey]):
    """The `size` items in a fresh random order each epoch, from (seed, epoch) alone, as (epoch, index) keys.

    The Trainer calls `set_epoch` before each epoch, a resumed one included. Every rank draws the same
    order; accelerate deals its batches out to the ranks.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[ItemKey]:
        order = list(range(self.size))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return iter([(self.epoch, index) for index in order])

    def __len__(self) -> int:
        return self.size


def train_dataloader(trainer: Trainer, sampler: Sampler) -> DataLoader:
    """The training DataLoader in `sampler`'s order, built and prepared as the Trainer builds its own.

    A Trainer that overrides the public `get_train_dataloader` with this needs no private sampler hook.
    """
    args = trainer.args
    loader = DataLoader(
        trainer.train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=trainer.data_collator,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        prefetch_factor=args.dataloader_prefetch_factor,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
    )
    return trainer.accelerator.prepare(loader)
