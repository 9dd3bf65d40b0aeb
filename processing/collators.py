"""Batch collators: stacking MIM examples, and mixup/cutmix with label smoothing for fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .random_state import ProcessLocalRNG


def _stack(values: Sequence, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stacks arrays, tensors or numbers along a new batch axis, cast to `dtype` if given (else their own)."""
    stacked = torch.stack([v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in values])
    return stacked if dtype is None else stacked.to(dtype)


class DataCollatorForMaskedImageModeling:
    """
    Stacks per-example outputs of `BeitV2ImageProcessor` (or `VQKDImageProcessor`) into batch tensors: the collator
    of the pretraining scripts' data loaders.

    The model inputs get fixed dtypes and shapes: float32 `pixel_values` `(batch, 3, H, W)` and
    `tokenizer_pixel_values` `(batch, 3, h, w)`, bool `bool_masked_pos` `(batch, num_patches)`, int64 `labels`
    `(batch,)`. Any other field is stacked as it comes (numbers and arrays keep their dtype), except strings (e.g.
    an `example_id` kept to audit which examples a rank reads), which stay a list.
    """

    _dtypes = {
        "pixel_values": torch.float32,
        "tokenizer_pixel_values": torch.float32,
        "bool_masked_pos": torch.bool,
        "labels": torch.long,
    }
    # Dimensions of one example's entry, so a batched processor output passed per example fails clearly.
    _example_ndim = {"pixel_values": 3, "tokenizer_pixel_values": 3, "bool_masked_pos": 1}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | list[str]]:
        if len(examples) == 0:
            raise ValueError("Cannot collate an empty list of examples")
        names = list(examples[0])
        for example in examples[1:]:
            if set(example) != set(names):
                raise ValueError(f"All examples must have the same fields, got {sorted(names)} and {sorted(example)}")
        batch: dict[str, torch.Tensor | list[str]] = {}
        for name in names:
            values = [example[name] for example in examples]
            if isinstance(values[0], str):
                batch[name] = list(values)
                continue
            shapes = {tuple(np.shape(v)) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"All '{name}' entries must have the same shape, got {sorted(shapes)}")
            ndim = self._example_ndim.get(name)
            if ndim is not None and len(next(iter(shapes))) != ndim:
                raise ValueError(
                    f"'{name}' of one example must have {ndim} dimensions, got shape {next(iter(shapes))} (call the "
                    "processor without return_tensors per example, or take entry [0] of its output)"
                )
            batch[name] = _stack(values, self._dtypes.get(name))
        return batch


class MixupCutmixCollator:
    """
    Stacks `pixel_values` and integer `labels`, then mixes the batch with its reverse by mixup or cutmix, returning
    soft `labels` of shape `(batch, num_classes)` with label smoothing (timm's `Mixup` in "batch" mode: one mixing
    coefficient per batch).

    Per batch, with probability `prob`: cutmix with probability `switch_prob` (when both are enabled), else mixup.
    Mixup draws lam ~ Beta(mixup_alpha, mixup_alpha) and blends images; cutmix draws lam ~ Beta(cutmix_alpha,
    cutmix_alpha), pastes a box of area ~ (1 - lam) whose centre is uniform over the image (clipped at the border),
    and recomputes lam from the pasted area. Targets: smoothed one-hot `y` (off value `label_smoothing /
    num_classes`, on value `1 - label_smoothing + off`) mixed as `lam * y + (1 - lam) * y.flip(0)`.

    Args:
        num_classes (`int`): Number of classes.
        mixup_alpha (`float`, defaults to 0.8): Beta parameter of mixup; 0 disables mixup.
        cutmix_alpha (`float`, defaults to 1.0): Beta parameter of cutmix; 0 disables cutmix.
        prob (`float`, defaults to 1.0): Probability of mixing a batch at all.
        switch_prob (`float`, defaults to 0.5): Probability of cutmix instead of mixup when both are enabled.
        label_smoothing (`float`, defaults to 0.1): Label smoothing.
        seed (`int` or `numpy.random.Generator`, *optional*): Seed (independent per DataLoader worker).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        seed: int | np.random.Generator | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(
                f"Alphas must be non-negative, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}"
            )
        for name, value in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self._rng = ProcessLocalRNG(seed)

    def _smoothed_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, dtype=torch.float32)
        return targets.scatter_(1, labels[:, None], 1.0 - self.label_smoothing + off)

    def _cutmix_box(self, lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        cut_ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
        center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip([center_y - cut_h // 2, center_y + cut_h // 2], 0, height)
        left, right = np.clip([center_x - cut_w // 2, center_x + cut_w // 2], 0, width)
        return int(top), int(bottom), int(left), int(right)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("Cannot collate an empty list of examples")
        rng = self._rng.generator
        pixel_values = _stack([example["pixel_values"] for example in examples], torch.float32)
        labels = torch.as_tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        lam = 1.0
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and rng.random() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
            if use_cutmix:
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                height, width = pixel_values.shape[-2:]
                top, bottom, left, right = self._cutmix_box(lam, height, width, rng)
                pixel_values[..., top:bottom, left:right] = pixel_values.flip(0)[..., top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (height * width)
            else:
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
                pixel_values = pixel_values * lam + pixel_values.flip(0) * (1.0 - lam)
        targets = self._smoothed_one_hot(labels)
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return {"pixel_values": pixel_values, "labels": targets}
