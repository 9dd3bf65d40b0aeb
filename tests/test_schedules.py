"""The learning-rate schedule of the pretraining scripts (examples/pretraining/loop.py): batch, steps, warmup, lr, schedules."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pretraining.loop import (
    build_lr_scheduler,
    resolve_learning_rate,
    resolve_training_steps,
    resolve_warmup_steps,
    total_batch_size,
)

# ---------------------------------------------------------------------------------------------------------------
# Batch, steps, warmup, learning rate


def test_total_batch_and_training_steps():
    assert total_batch_size(4, 3, num_processes=2) == 24
    assert resolve_training_steps(-1, 2.5, num_examples=240, total_batch=24) == 25  # 10 steps per epoch x 2.5
    assert resolve_training_steps(-1, 2.5, num_examples=5, total_batch=24) == 3  # at least one step per epoch
    assert resolve_training_steps(7, 1.0, num_examples=None, total_batch=24) == 7
    with pytest.raises(ValueError, match="unknown for this stream.*give --max_steps"):
        resolve_training_steps(-1, 2.5, num_examples=None, total_batch=24)
    with pytest.raises(ValueError, match="--num_processes must be >= 1"):
        total_batch_size(4, 3, num_processes=0)


def test_warmup_steps_count_or_fraction(caplog):
    assert resolve_warmup_steps(0, 100) == 0
    assert resolve_warmup_steps(0.05, 100) == 5
    assert resolve_warmup_steps(10 / 300, 1000) == 34  # rounded up, as transformers
    assert resolve_warmup_steps(0.05, 2) == 1
    assert resolve_warmup_steps(1, 100) == 1  # 1 is a step count, not 100%
    assert resolve_warmup_steps(20, 100) == 20
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="pretraining.loop"):
        assert resolve_warmup_steps(20, 10) == 20
    assert "The warmup (20 steps) lasts the whole run (10 steps)" in caplog.text


def peak_lr(learning_rate=None, per_device=8, processes=1, scheduler="cosine_with_min_lr") -> float:
    """resolve_learning_rate with the pretraining defaults (no accumulation, min lr 1e-5) and run_mim's paper lr."""
    return resolve_learning_rate(
        learning_rate,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=1,
        num_processes=processes,
        paper_lr=1.5e-3,
        paper_batch=2048,
        min_learning_rate=1e-5,
        lr_scheduler_type=scheduler,
    )


def test_learning_rate_scaling_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="pretraining.loop"):
        lr = peak_lr(per_device=128, processes=8)
    assert lr == pytest.approx(1.5e-3 / 2)
    assert "Peak learning rate 0.00075 (the paper's 0.0015 at batch 2048 scaled linearly" in caplog.text
    assert "WARNING" not in caplog.text
    assert peak_lr(3e-4, processes=8) == 3e-4


def test_learning_rate_below_min_lr_warns(caplog):
    # The README's smoke run: batch 8 on one process scales 1.5e-3 at 2048 down to 5.9e-6, below the 1e-5 floor.
    with caplog.at_level(logging.WARNING, logger="pretraining.loop"):
        lr = peak_lr(per_device=8, processes=1)
    assert lr == pytest.approx(5.859375e-6)
    assert (
        "The peak learning rate 5.86e-06 (the paper's 0.0015 at batch 2048 scaled linearly to the total batch 8) "
        "is not above --min_learning_rate 1e-05, so the cosine_with_min_lr schedule stays flat at it: a short run "
        "at this lr learns next to nothing; pass --learning_rate or use a larger total batch." in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretraining.loop"):
        peak_lr(1e-6, scheduler="linear")
    assert "(--learning_rate) is not above --min_learning_rate 1e-05: a short run" in caplog.text
    assert "raise --learning_rate or lower --min_learning_rate" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def lrs(scheduler, steps: int) -> list[float]:
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def schedule(optimizer, steps: int, kind: str = "cosine_with_min_lr", warmup_steps: float = 0, min_lr: float = 1e-5):
    return build_lr_scheduler(
        optimizer, kind, num_training_steps=steps, warmup_steps=warmup_steps, min_learning_rate=min_lr
    )


def test_cosine_with_min_lr_matches_the_plain_schedule_and_reaches_min_lr():
    ours = lrs(schedule(optimizer(), 20, warmup_steps=0.2, min_lr=1e-5), 20)
    plain = lrs(get_cosine_with_min_lr_schedule_with_warmup(optimizer(), 4, 20, min_lr=1e-5), 20)
    assert ours == pytest.approx(plain, rel=1e-12, abs=0)
    assert ours[0] == 0 and ours[2] == pytest.approx(5e-4) and ours[4] == pytest.approx(1e-3)
    assert ours[-1] == pytest.approx(1e-5)
    assert all(later <= earlier for earlier, later in zip(ours[4:], ours[5:]))


def test_warmup_min_lr_schedule_ends_at_min_lr():
    values = lrs(schedule(optimizer(), 10, "cosine_warmup_with_min_lr", warmup_steps=2, min_lr=1e-4), 10)
    # transformers' variant starts the warmup above 0 and reaches the minimum at the last step that trains.
    assert values[:2] == pytest.approx([5e-4, 1e-3]) and values[9] == pytest.approx(1e-4)


def test_min_lr_above_peak_gives_a_flat_schedule():
    values = lrs(schedule(optimizer(1e-6), 10, min_lr=1e-5), 10)
    assert values == pytest.approx([1e-6] * 11)


def test_linear_and_constant_with_warmup_schedules():
    linear = lrs(schedule(optimizer(), 10, "linear", warmup_steps=2), 10)
    assert linear[:3] == pytest.approx([0, 5e-4, 1e-3]) and linear[6] == pytest.approx(5e-4) and linear[-1] == 0
    constant = lrs(schedule(optimizer(), 4, "constant_with_warmup", warmup_steps=0.5), 8)
    assert constant == pytest.approx([0, 5e-4] + [1e-3] * 7)
