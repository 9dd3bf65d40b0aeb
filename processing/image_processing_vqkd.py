"""Image processor of the VQ-KD visual tokenizer (BEiT v2, stage 1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .augmentation import SingleViewAugmentation
from .processor_settings import (
    SettingsMixin,
    check_augmentation_overrides,
    check_view_size,
    normalised_batch,
    resolve_rng,
)
from .transforms import CenterCrop, Compose, Resize


class VQKDImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    interpolation: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    crop_pct: float


# The settings of the evaluation view and the normalisation; each can be overridden for one call.
_CALL_SETTINGS = ("image_size", "interpolation", "crop_pct", "image_mean", "image_std")
# The settings `training_augmentation` reads, by SingleViewAugmentation's argument names.
_AUGMENTATION_SETTINGS = ("image_size", "crop_scale", "crop_ratio", "interpolation")
_TO_PRETRAINING = (
    "training views are asked for by name: `processor.pretraining_inputs(images, "
    "augmentation=processor.training_augmentation(), rng=generator)`."
)
_TO_AUGMENTATION = (
    "the crop settings configure the training augmentation: build it with "
    "`processor.training_augmentation(crop_scale=...)` and pass it to `pretraining_inputs(..., augmentation=...)`."
)
# Where the arguments of the other methods go, for the error messages of `pretraining_inputs` and `preprocess`.
_PRETRAINING_ELSEWHERE = dict.fromkeys(_AUGMENTATION_SETTINGS, _TO_AUGMENTATION)
_PREPROCESS_ELSEWHERE = {**_PRETRAINING_ELSEWHERE, "augmentation": _TO_PRETRAINING, "rng": _TO_PRETRAINING}


class VQKDImageProcessor(SettingsMixin, BaseImageProcessor):
    r"""
    Prepares images for the VQ-KD tokenizer: plain [0, 1] pixels by default, which `VQKDModel` maps to its encoder's
    [-1, 1] itself (and a teacher normalises its own way).

    **Inference** (pipelines, `AutoImageProcessor` users): `processor(images)` returns `pixel_values`, the
    reference's deterministic validation transform: the shorter side resized to `int(image_size / crop_pct)`, then
    the central `image_size` square.

    **Training** asks for its view by name, as `BeitV2ImageProcessor` does:
    `processor.pretraining_inputs(images, augmentation=processor.training_augmentation(), rng=generator)`, where
    `training_augmentation()` is the VQ-KD training recipe of this processor's settings (a
    `SingleViewAugmentation`): RandomResizedCrop(`image_size`, `crop_scale`, `crop_ratio`) then a horizontal flip
    with probability 0.5. The augmentation draws from `rng` (required; the processor holds no random state);
    without `augmentation` the view is the evaluation view.

    Args:
        image_size (`int`, defaults to 224): Output side length.
        interpolation (`str`, defaults to "bicubic"): PIL resampling filter.
        image_mean, image_std (`tuple[float, float, float]`, defaults to 0 and 1): Normalisation `(x - mean) / std`;
            the defaults leave the pixels in [0, 1], what `VQKDModel` reads.
        crop_scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Area range of the training crop.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the training crop.
        crop_pct (`float`, *optional*): Evaluation crop fraction; by default the reference's rule, 224/256 below
            384 px and 1.0 from 384 px.
        do_convert_rgb (`bool`, defaults to `True`): Convert every image to RGB (alpha composited over white); with
            `False`, `processor(images)` keeps the images' own channels (`image_mean` / `image_std` then need one
            value per channel). `pretraining_inputs` always reads RGB.

    Settings can be changed afterwards (`processor.image_size = 112`) or, for `image_size`, `interpolation`,
    `crop_pct`, `image_mean` and `image_std`, for one call (`processor(images, image_size=112)`), as with
    transformers' processors, which also take the standard `do_convert_rgb`, `input_data_format` and
    `return_tensors`. The training-only settings (`crop_scale`, `crop_ratio`) are overridden in
    `training_augmentation(crop_scale=...)`.

    Calling it on images (PIL, numpy `(H, W[, C])`/`(C, H, W)`, torch, or a list of them, any PIL mode) returns a
    `BatchFeature` with `pixel_values`: a list of `(3, image_size, image_size)` float32 arrays, or one stacked
    array/tensor of shape `(batch, 3, image_size, image_size)` when `return_tensors` is "np" or "pt".
    """

    model_input_names = ["pixel_values"]
    # What `pretraining_inputs` returns (the same name: VQ-KD trains on one view).
    pretraining_input_names = ["pixel_values"]
    valid_kwargs = VQKDImageProcessorKwargs
    # A class attribute too: transformers' tests (and callers) look for the standard argument on the class.
    do_convert_rgb = True
    _evaluation_settings = _CALL_SETTINGS
    _preprocess_elsewhere = _PREPROCESS_ELSEWHERE

    def __init__(
        self,
        image_size: int = 224,
        interpolation: str = "bicubic",
        image_mean: Sequence[float] = (0.0, 0.0, 0.0),
        image_std: Sequence[float] = (1.0, 1.0, 1.0),
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        crop_pct: float | None = None,
        do_convert_rgb: bool | None = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.crop_scale = [float(v) for v in crop_scale]
        self.crop_ratio = [float(v) for v in crop_ratio]
        self.crop_pct = crop_pct
        # None (a config or call that leaves it unset) means the default, as in transformers.
        self.do_convert_rgb = True if do_convert_rgb is None else bool(do_convert_rgb)
        # Bad settings fail here rather than at the first image.
        _evaluation_view(self.image_size, self.interpolation, self.crop_pct)
        self.training_augmentation()

    def training_augmentation(self, **overrides) -> SingleViewAugmentation:
        """
        The VQ-KD training augmentation of this processor's current settings, as a `SingleViewAugmentation` to pass
        to `pretraining_inputs(images, augmentation=..., rng=...)`.

        Args:
            overrides: Any of `image_size`, `crop_scale`, `crop_ratio`, `interpolation`, for this augmentation only.
        """
        check_augmentation_overrides(overrides, _AUGMENTATION_SETTINGS)
        return SingleViewAugmentation(
            **{name: overrides.get(name, getattr(self, name)) for name in _AUGMENTATION_SETTINGS}
        )

    def _evaluation_transform(self, current: Mapping[str, Any]) -> Compose:
        """The evaluation view of `preprocess` (settings: `image_size`, `interpolation`, `crop_pct`)."""
        return _evaluation_view(int(current["image_size"]), current["interpolation"], current["crop_pct"])

    def pretraining_inputs(
        self,
        images,
        *,
        rng: np.random.Generator | int,
        augmentation: SingleViewAugmentation | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = None,
        **settings,
    ) -> BatchFeature:
        """
        The tokenizer-training view of each image (`pixel_values`), RGB.

        Args:
            images: One image or a list/batch of images (PIL, numpy, torch).
            rng (`numpy.random.Generator` or `int`): Generator of the augmentation (or its seed), drawn from image
                after image. Required: give each call (or each example) its own generator.
            augmentation (`Callable[[PIL.Image.Image, numpy.random.Generator], PIL.Image.Image]`, *optional*):
                Produces the view of each image, e.g. `self.training_augmentation()`; by default the deterministic
                evaluation view.
            input_data_format (`str` or `ChannelDimension`, *optional*): "channels_first" or "channels_last" for
                array inputs; inferred by default.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any of `image_size`, `interpolation`, `crop_pct`, `image_mean`, `image_std`, for this call
                only.
        """
        current = self._call_settings("pretraining_inputs", settings, _CALL_SETTINGS, _PRETRAINING_ELSEWHERE)
        view: Callable[[PIL.Image.Image], PIL.Image.Image] = self._evaluation_transform(current)
        rng = resolve_rng(rng)
        if augmentation is not None:
            view = _training_view(augmentation, rng, int(current["image_size"]))
        return normalised_batch(
            images, view, current["image_mean"], current["image_std"], True, input_data_format, return_tensors
        )


def _training_view(
    augmentation: SingleViewAugmentation, rng: np.random.Generator, image_size: int
) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """`augmentation`'s view drawn from `rng`, checked to be the `image_size` square of the processor's settings."""

    def view(image: PIL.Image.Image) -> PIL.Image.Image:
        image = augmentation(image, rng)
        check_view_size(image, image_size, "view", "image_size")
        return image

    return view


def _evaluation_view(image_size: int, interpolation: str, crop_pct: float | None) -> Compose:
    """The reference's validation transform: shorter side to `int(image_size / crop_pct)`, central square."""
    if crop_pct is None:
        crop_pct = 224 / 256 if image_size < 384 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return Compose([Resize(int(image_size / crop_pct), interpolation), CenterCrop(int(image_size))])
