"""The learning-rate schedule of the pretraining scripts, from their parsed arguments.

Total batch size, the peak learning rate (the paper's, scaled linearly to the total batch, unless
``--learning_rate`` is given), the number of optimizer steps, the warmup, and transformers' scheduler built from them.
"""

from __future__ import annotations

import logging
import math

import torch
from pretraining_arguments import (
    LR_SCHEDULER_CHOICES,
    MIN_LR_SCHEDULERS,
    PretrainingArguments,
    check_choice,
    check_range,
)
from transformers import get_scheduler

logger = logging.getLogger(__name__)


def total_batch_size(args: PretrainingArguments, num_processes: int) -> int:
    """Examples per optimizer step over all processes: per-device batch x accumulation x processes."""
    check_range("num_processes", num_processes, low=1)
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes


def resolve_learning_rate(args: PretrainingArguments, num_processes: int, paper_lr: float, paper_batch: int) -> float:
    """``--learning_rate``, or the paper's peak lr scaled linearly from its batch size to the total batch.

    Logs the result and where it comes from, and warns when it is not above ``--min_learning_rate``: a small
    total batch scales the paper's lr down so far (1.5e-3 at 2048 -> 5.9e-6 at 8) that a short run learns nothing,
    and the min-lr cosine schedules then stay flat.
    """
    check_range("paper_batch", paper_batch, low=1)
    batch = total_batch_size(args, num_processes)
    if args.learning_rate is not None:
        learning_rate, origin = args.learning_rate, "--learning_rate"
    else:
        learning_rate = paper_lr * batch / paper_batch
        origin = f"the paper's {paper_lr:.3g} at batch {paper_batch} scaled linearly to the total batch {batch}"
    logger.info(
        "Peak learning rate %.3g (%s; %d per device x %d accumulation steps x %d processes).",
        learning_rate,
        origin,
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        num_processes,
    )
    if learning_rate <= args.min_learning_rate:
        flat = (
            f", so the {args.lr_scheduler_type} schedule stays flat at it"
            if args.lr_scheduler_type in MIN_LR_SCHEDULERS
            else ""
        )
        advice = (
            "pass --learning_rate or use a larger total batch"
            if args.learning_rate is None
            else "raise --learning_rate or lower --min_learning_rate"
        )
        logger.warning(
            "The peak learning rate %.3g (%s) is not above --min_learning_rate %.3g%s: a short run at this lr "
            "learns next to nothing; %s.",
            learning_rate,
            origin,
            args.min_learning_rate,
            flat,
            advice,
        )
    return learning_rate


def resolve_training_steps(args: PretrainingArguments, num_examples: int | None, num_processes: int) -> int:
    """``--max_steps``, or ``--num_train_epochs`` of ``num_examples`` at the total batch (at least one step).

    Raises:
        ValueError: epochs were asked for but the stream does not know its size (``num_examples`` is None).
    """
    if args.max_steps > 0:
        return args.max_steps
    if num_examples is None:
        raise ValueError(
            "The number of training examples is unknown for this stream, so --num_train_epochs "
            f"{args.num_train_epochs} cannot be turned into steps; give --max_steps."
        )
    steps_per_epoch = max(1, num_examples // total_batch_size(args, num_processes))
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def resolve_warmup_steps(args: PretrainingArguments, num_training_steps: int) -> int:
    """``--warmup_steps`` in optimizer steps: taken as is when >= 1, else a fraction of ``num_training_steps``
    (rounded up, as transformers does). Warns when the warmup does not end before training does."""
    check_range("num_training_steps", num_training_steps, low=1)
    if args.warmup_steps >= 1:
        warmup = int(args.warmup_steps)
    else:
        warmup = math.ceil(args.warmup_steps * num_training_steps)
    if warmup >= num_training_steps:
        logger.warning(
            "The warmup (%d steps) lasts the whole run (%d steps): the peak learning rate is never passed. "
            "Give --warmup_steps as a fraction below 1 (e.g. 0.05) to scale it with the run.",
            warmup,
            num_training_steps,
        )
    return warmup


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: PretrainingArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' ``get_scheduler(args.lr_scheduler_type)`` with :func:`resolve_warmup_steps` of warmup.

    Stepped once per optimizer step. The min-lr schedules end at ``--min_learning_rate``, as a fraction of the
    optimizer's default lr (so every parameter group ends at the same fraction of its own lr); a min lr above the
    peak is lowered to the peak (a flat schedule, which :func:`resolve_learning_rate` warns about).
    """
    check_choice("lr_scheduler_type", args.lr_scheduler_type, LR_SCHEDULER_CHOICES)
    warmup = resolve_warmup_steps(args, num_training_steps)
    scheduler_kwargs = None
    if args.lr_scheduler_type in MIN_LR_SCHEDULERS:
        peak = optimizer.defaults["lr"]
        scheduler_kwargs = {"min_lr_rate": min(args.min_learning_rate, peak) / peak}
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_kwargs,
    )
