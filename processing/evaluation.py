"""One home for the deterministic preprocessing of native `beit` models: normalisation and evaluation processors.

Every place that saves or evaluates a native transformers `beit` checkpoint (fine-tuning, linear probe, segmentation,
the checkpoint converter) builds its image processor here, so a fine-tuned model, a converted one and the evaluation
that measured them all see the same pixels.

The processor is transformers' `BeitImageProcessorPil`, constructed explicitly: `BeitImageProcessor` needs
torchvision and otherwise falls back to this class with a warning on every run. transformers saves either backend as
`image_processor_type: "BeitImageProcessor"`, so `AutoImageProcessor`, `pipeline()` and the Hub widget load a saved
folder with their default backend (torchvision where installed); pass `backend="pil"` to `from_pretrained` to get
exactly the pixels the evaluation here saw (the two backends resample slightly differently).
"""

from __future__ import annotations

import math
from typing import Any

from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)
from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil

from .transforms import resample_filter

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]

# BEiT v2 (and fine-tuned models from it) normalise with ImageNet's statistics; BEiT v1 maps pixels to [-1, 1].
FAMILY_NORMALISATION: dict[str, Normalisation] = {
    "beitv2": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "beit": (tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD)),
}
# The resampling filters of the reference evaluation transforms (BEiT, BEiT v2, the DALL-E dVAE).
_RESAMPLE_CHOICES = ("bicubic", "bilinear", "lanczos")


def family_normalisation(family: str | None) -> Normalisation:
    """Pixel mean and std of a model family: `"beit"` (BEiT v1: 0.5 / 0.5) or `"beitv2"` (ImageNet's; also the
    default for `None`)."""
    if family is None:
        family = "beitv2"
    if family not in FAMILY_NORMALISATION:
        raise ValueError(f"Unknown model family {family!r}; choose one of {sorted(FAMILY_NORMALISATION)}.")
    return FAMILY_NORMALISATION[family]


def saved_normalisation(model_name_or_path: str, **hub_kwargs) -> Normalisation:
    """The pixel mean and std a checkpoint was trained with, read from its saved image processor config.

    A backbone must see images normalised as in pretraining: BEiT v2 checkpoints use ImageNet's statistics, BEiT v1
    ones 0.5 / 0.5. A checkpoint without an image processor config (or without mean/std in it) gets ImageNet's.
    `hub_kwargs` (`cache_dir`, `revision`, `token`) go to the config download.
    """
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(model_name_or_path, **hub_kwargs)
    except OSError:
        return family_normalisation(None)
    mean, std = processor_dict.get("image_mean"), processor_dict.get("image_std")
    if mean is None or std is None:
        return family_normalisation(None)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def evaluation_image_processor(
    image_size: int,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
    crop_pct: float | None = 0.875,
    resample: str = "bicubic",
    do_reduce_labels: bool = False,
) -> BeitImageProcessorPil:
    """A native `beit` processor for evaluation and inference.

    Args:
        image_size: Side of the square the model sees.
        image_mean, image_std: Per-channel normalisation of [0, 1] pixels (see `family_normalisation`,
            `saved_normalisation`).
        crop_pct: With a value, the reference evaluation transform: the shorter side resized to
            `floor(image_size / crop_pct)` (aspect ratio kept), then a centre crop of `image_size` (`crop_pct=1`
            resizes the shorter side to `image_size` and crops the longer one). `None`: the whole image resized to
            `image_size` x `image_size` (masked image modeling, tokenizers, segmentation).
        resample: "bicubic", "bilinear" or "lanczos".
        do_reduce_labels: Segmentation only: map label 0 (background) to 255 and shift the others down by one.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}.")
    if resample not in _RESAMPLE_CHOICES:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE_CHOICES)}, got {resample!r}.")
    geometry: dict[str, Any]
    if crop_pct is None:
        geometry = {"size": {"height": image_size, "width": image_size}, "do_center_crop": False}
    else:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        geometry = {
            "size": {"shortest_edge": int(math.floor(image_size / crop_pct))},
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
        }
    return BeitImageProcessorPil(
        do_resize=True,
        **geometry,
        resample=resample_filter(resample),
        do_normalize=True,
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
        do_reduce_labels=do_reduce_labels,
    )
