"""The learning-rate schedule of the pretraining scripts (examples/schedules.py): batch, steps, warmup, lr, schedules."""

from __future__ import annotations

import logging

import pytest
import torch
from schedules import (
    build_lr_scheduler,
    resolve_learning_rate,
    resolve_training_steps,
    resolve_warmup_steps,
    total_batch_size,
)
from test_pretraining_arguments import no_launcher_precision, training_args  # noqa: F401 (an autouse fixture)
from transformers import get_cosine_with_min_lr_schedule_with_warmup

# ---------------------------------------------------------------------------------------------------------------
# Batch, steps, warmup, learning rate


def test_total_batch_and_training_steps():
    args = training_args(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2.5)
    assert total_batch_size(args, num_processes=2) == 24
    assert resolve_training_steps(args, num_examples=240, num_processes=2) == 25  # 10 steps per epoch x 2.5
    assert resolve_training_steps(args, num_examples=5, num_processes=2) == 3  # at least one step per epoch
    assert resolve_training_steps(training_args(max_steps=7), num_examples=None, num_processes=2) == 7
    with pytest.raises(ValueError, match="unknown for this stream.*give --max_steps"):
        resolve_training_steps(args, num_examples=None, num_processes=2)
    with pytest.raises(ValueError, match="--num_processes must be >= 1"):
        total_batch_size(args, num_processes=0)


def test_warmup_steps_count_or_fraction(caplog):
    assert resolve_warmup_steps(training_args(warmup_steps=0), 100) == 0
    assert resolve_warmup_steps(training_args(warmup_steps=0.05), 100) == 5
    assert resolve_warmup_steps(training_args(warmup_steps=10 / 300), 1000) == 34  # rounded up, as transformers
    assert resolve_warmup_steps(training_args(warmup_steps=0.05), 2) == 1
    assert resolve_warmup_steps(training_args(warmup_steps=1), 100) == 1  # 1 is a step count, not 100%
    assert resolve_warmup_steps(training_args(warmup_steps=20), 100) == 20
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="schedules"):
        assert resolve_warmup_steps(training_args(warmup_steps=20), 10) == 20
    assert "The warmup (20 steps) lasts the whole run (10 steps)" in caplog.text


def test_learning_rate_scaling_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="schedules"):
        lr = resolve_learning_rate(training_args(per_device_train_batch_size=128), 8, 1.5e-3, 2048)
    assert lr == pytest.approx(1.5e-3 / 2)
    assert "Peak learning rate 0.00075 (the paper's 0.0015 at batch 2048 scaled linearly" in caplog.text
    assert "WARNING" not in caplog.text
    assert resolve_learning_rate(training_args(learning_rate=3e-4), 8, 1.5e-3, 2048) == 3e-4


def test_learning_rate_below_min_lr_warns(caplog):
    # The README's smoke run: batch 8 on one process scales 1.5e-3 at 2048 down to 5.9e-6, below the 1e-5 floor.
    with caplog.at_level(logging.WARNING, logger="schedules"):
        lr = resolve_learning_rate(training_args(per_device_train_batch_size=8), 1, 1.5e-3, 2048)
    assert lr == pytest.approx(5.859375e-6)
    assert (
        "The peak learning rate 5.86e-06 (the paper's 0.0015 at batch 2048 scaled linearly to the total batch 8) "
        "is not above --min_learning_rate 1e-05, so the cosine_with_min_lr schedule stays flat at it: a short run "
        "at this lr learns next to nothing; pass --learning_rate or use a larger total batch." in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="schedules"):
        resolve_learning_rate(training_args(learning_rate=1e-6, lr_scheduler_type="linear"), 1, 1.5e-3, 2048)
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


def test_cosine_with_min_lr_matches_the_plain_schedule_and_reaches_min_lr():
    args = training_args(warmup_steps=0.2, min_learning_rate=1e-5)
    ours = lrs(build_lr_scheduler(optimizer(), args, 20), 20)
    plain = lrs(get_cosine_with_min_lr_schedule_with_warmup(optimizer(), 4, 20, min_lr=1e-5), 20)
    assert ours == pytest.approx(plain, rel=1e-12, abs=0)
    assert ours[0] == 0 and ours[2] == pytest.approx(5e-4) and ours[4] == pytest.approx(1e-3)
    assert ours[-1] == pytest.approx(1e-5)
    assert all(later <= earlier for earlier, later in zip(ours[4:], ours[5:]))


def test_warmup_min_lr_schedule_ends_at_min_lr():
    args = training_args(warmup_steps=2, min_learning_rate=1e-4, lr_scheduler_type="cosine_warmup_with_min_lr")
    values = lrs(build_lr_scheduler(optimizer(), args, 10), 10)
    # transformers' variant starts the warmup above 0 and reaches the minimum at the last step that trains.
    assert values[:2] == pytest.approx([5e-4, 1e-3]) and values[9] == pytest.approx(1e-4)


def test_min_lr_above_peak_gives_a_flat_schedule():
    values = lrs(build_lr_scheduler(optimizer(1e-6), training_args(min_learning_rate=1e-5), 10), 10)
    assert values == pytest.approx([1e-6] * 11)


def test_linear_and_constant_with_warmup_schedules():
    linear = lrs(build_lr_scheduler(optimizer(), training_args(warmup_steps=2, lr_scheduler_type="linear"), 10), 10)
    assert linear[:3] == pytest.approx([0, 5e-4, 1e-3]) and linear[6] == pytest.approx(5e-4) and linear[-1] == 0
    args = training_args(warmup_steps=0.5, lr_scheduler_type="constant_with_warmup")
    constant = lrs(build_lr_scheduler(optimizer(), args, 4), 8)
    assert constant == pytest.approx([0, 5e-4] + [1e-3] * 7)
