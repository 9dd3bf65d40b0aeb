"""Image processor of the VQ-KD visual tokenizer (BEiT v2, stage 1)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .augmentation import SingleViewAugmentation
from .processor_settings import (
    check_augmentation_overrides,
    check_call_settings,
    check_view_size,
    drop_removed_seed,
    resolve_rng,
)
from .transforms import CenterCrop, Compose, Resize, make_image_list, to_float_array, to_pil_image


class VQKDImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    interpolation: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    crop_pct: float


logger = logging.getLogger(__name__)
# Normalisation that processors of earlier versions saved: they mapped the pixels to [-1, 1] for VQ-KD, which the
# tokenizer now does itself.
_EARLIER_VERSION_NORMALISATION = [0.5, 0.5, 0.5]
# The settings `preprocess` reads (evaluation view, normalisation); each can be overridden for one call.
_PREPROCESS_SETTINGS = ("image_size", "interpolation", "crop_pct", "image_mean", "image_std")
# The settings `training_augmentation` reads, by SingleViewAugmentation's argument names.
_AUGMENTATION_SETTINGS = ("image_size", "crop_scale", "crop_ratio", "interpolation")


class VQKDImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for the VQ-KD tokenizer: plain [0, 1] pixels by default, which `VQKDModel` maps to its encoder's
    [-1, 1] itself (and a teacher normalises its own way).

    - Evaluation (default), the reference's validation transform: the shorter side resized to
      `int(image_size / crop_pct)`, then the central `image_size` square.
    - Training: `processor(images, augmentation=processor.training_augmentation(), rng=generator)`, where
      `training_augmentation()` is the VQ-KD training recipe of this processor's settings (a
      `SingleViewAugmentation`): RandomResizedCrop(`image_size`, `crop_scale`, `crop_ratio`) then a horizontal flip
      with probability 0.5.

    The processor holds no random state: the augmentation draws from the `rng` of the call (a fixed seed when none
    is given).

    Args:
        image_size (`int`, defaults to 224): Output side length.
        interpolation (`str`, defaults to "bicubic"): PIL resampling filter.
        image_mean, image_std (`tuple[float, float, float]`, defaults to 0 and 1): Normalisation `(x - mean) / std`;
            the defaults leave the pixels in [0, 1], what `VQKDModel` reads. Saved configs of earlier versions hold
            0.5 / 0.5 (the [-1, 1] that the model now applies itself): set them back to 0 / 1 for the tokenizer.
        crop_scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Area range of the training crop.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the training crop.
        crop_pct (`float`, *optional*): Evaluation crop fraction; by default the reference's rule, 224/256 below
            384 px and 1.0 from 384 px.

    Settings can be changed afterwards (`processor.image_size = 112`) or, for the settings `preprocess` reads, for
    one call (`processor(images, image_size=112)`), as with transformers' processors. The training-only settings
    (`crop_scale`, `crop_ratio`) are overridden in `training_augmentation(crop_scale=...)`.

    Calling it on images (PIL, numpy `(H, W[, C])`/`(C, H, W)`, torch, or a list of them, any PIL mode) returns a
    `BatchFeature` with `pixel_values`: a list of `(3, image_size, image_size)` float32 arrays, or one stacked
    array/tensor of shape `(batch, 3, image_size, image_size)` when `return_tensors` is "np" or "pt".
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = VQKDImageProcessorKwargs

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any):
        """As `BaseImageProcessor.from_dict`, but a config saved by an earlier version (mean and std 0.5: the
        [-1, 1] mapping that `VQKDModel` now applies itself) loads as plain [0, 1] pixels, with a warning, instead of
        giving the tokenizer doubly mapped pixels and wrong codes without a word."""
        image_processor_dict = dict(image_processor_dict)
        mean, std = image_processor_dict.get("image_mean"), image_processor_dict.get("image_std")
        if mean is not None and std is not None and [*mean] == [*std] == _EARLIER_VERSION_NORMALISATION:
            logger.warning(
                "This VQKDImageProcessor config was saved by an earlier version, which mapped pixels to [-1, 1] for "
                "the tokenizer (mean 0.5, std 0.5). VQKDModel now maps [0, 1] pixels itself, so the processor is "
                "loaded with mean 0 and std 1; save it again to update the file."
            )
            image_processor_dict.update(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        return super().from_dict(image_processor_dict, **kwargs)

    def __init__(
        self,
        image_size: int = 224,
        interpolation: str = "bicubic",
        image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        image_std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        crop_pct: float | None = None,
        **kwargs,
    ):
        drop_removed_seed(kwargs)
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.crop_scale = [float(v) for v in crop_scale]
        self.crop_ratio = [float(v) for v in crop_ratio]
        self.crop_pct = crop_pct
        # Bad settings fail here rather than at the first image.
        _evaluation_view(self.image_size, self.interpolation, self.crop_pct)
        self.training_augmentation()

    def training_augmentation(self, **overrides) -> SingleViewAugmentation:
        """
        The VQ-KD training augmentation of this processor's current settings, as a `SingleViewAugmentation` to pass
        to `preprocess(images, augmentation=..., rng=...)`.

        Args:
            overrides: Any of `image_size`, `crop_scale`, `crop_ratio`, `interpolation`, for this augmentation only.
        """
        check_augmentation_overrides(overrides, _AUGMENTATION_SETTINGS)
        return SingleViewAugmentation(
            **{name: overrides.get(name, getattr(self, name)) for name in _AUGMENTATION_SETTINGS}
        )

    def preprocess(
        self,
        images,
        augmentation: SingleViewAugmentation | None = None,
        rng: np.random.Generator | int | None = None,
        return_tensors: str | None = None,
        **settings,
    ) -> BatchFeature:
        """
        Args:
            images: One image or a list/batch of images (PIL, numpy, torch).
            augmentation (`Callable[[PIL.Image.Image, numpy.random.Generator], PIL.Image.Image]`, *optional*):
                Produces the view of each image, e.g. `self.training_augmentation()`; by default the deterministic
                evaluation view.
            rng (`numpy.random.Generator` or `int`, *optional*): Generator of the augmentation (or its seed), drawn
                from image after image; by default a generator with a fixed seed.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any of `image_size`, `interpolation`, `crop_pct`, `image_mean`, `image_std`, for this call
                only.
        """
        check_call_settings(settings, _PREPROCESS_SETTINGS, _AUGMENTATION_SETTINGS, type(self).__name__)
        current = {name: settings.get(name, getattr(self, name)) for name in _PREPROCESS_SETTINGS}
        mean = np.asarray(current["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(current["image_std"], dtype=np.float32)[:, None, None]
        size = int(current["image_size"])
        evaluation_view = _evaluation_view(size, current["interpolation"], current["crop_pct"])
        rng = resolve_rng(rng)
        pixel_values = []
        for raw in make_image_list(images):
            image = to_pil_image(raw)
            if augmentation is None:
                image = evaluation_view(image)
            else:
                image = augmentation(image, rng)
                check_view_size(image, size, "view", "image_size")
            pixel_values.append((to_float_array(image) - mean) / std)
        if return_tensors is not None:
            pixel_values = np.stack(pixel_values)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


def _evaluation_view(image_size: int, interpolation: str, crop_pct: float | None) -> Compose:
    """The reference's validation transform: shorter side to `int(image_size / crop_pct)`, central square."""
    if crop_pct is None:
        crop_pct = 224 / 256 if image_size < 384 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return Compose([Resize(int(image_size / crop_pct), interpolation), CenterCrop(int(image_size))])
