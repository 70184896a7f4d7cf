"""TrainSettings -> TrainingArguments: the schedule the Trainer builds from them."""

import pytest
from torch import nn
from transformers import Trainer

from llm2clip import cli
from llm2clip.errors import InputError
from llm2clip.training import TrainSettings, training_arguments


def trainer_learning_rates(tmp_path, steps: int, max_steps: int | None = None, **settings) -> list[float]:
    """The learning rate of each of `steps` optimizer steps, from the scheduler the Trainer creates.

    `max_steps` -1 stands for a run of a number of epochs, whose step count the Trainer works out.
    """
    max_steps = steps if max_steps is None else max_steps
    args = training_arguments(TrainSettings(max_steps=max_steps, learning_rate=1.0, **settings), tmp_path)
    trainer = Trainer(model=nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path, scheduler):
    rates = trainer_learning_rates(tmp_path, 10, warmup_ratio=0.5, lr_scheduler=scheduler)
    assert rates[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # rises over 5 steps
    assert rates[6] < 1.0


@pytest.mark.parametrize("max_steps", [10, -1])
def test_warmup_ratio_one_warms_up_over_every_step(tmp_path, max_steps):
    rates = trainer_learning_rates(tmp_path, 10, max_steps, warmup_ratio=1.0, lr_scheduler="linear")
    assert rates == pytest.approx([i / 10 for i in range(10)])


def test_warmup_ratio_zero_starts_at_the_peak(tmp_path):
    assert trainer_learning_rates(tmp_path, 4, warmup_ratio=0.0, lr_scheduler="constant_with_warmup")[0] == 1.0


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_warmup_ratio_outside_zero_one_is_refused(tmp_path, ratio):
    with pytest.raises(InputError, match=r"train.warmup_ratio must be in \[0, 1\], got"):
        training_arguments(TrainSettings(warmup_ratio=ratio), tmp_path)


def test_unknown_lr_scheduler_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    code = cli.main(["stage2", f"out_dir={tmp_path}", "train.lr_scheduler=cosin"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "unknown train.lr_scheduler 'cosin'" in err and "cosine" in err and "linear" in err


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16_only(tmp_path, monkeypatch, avx512_bf16, amx, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    args = training_arguments(TrainSettings(precision="auto"), tmp_path)
    assert (args.bf16, args.fp16) == (expected, False)
    assert training_arguments(TrainSettings(precision="fp32"), tmp_path).bf16 is False
