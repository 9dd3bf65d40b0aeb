"""Image processor of the VQ-KD visual tokenizer (BEiT v2, stage 1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .random_state import ProcessLocalRNG
from .settings_cache import SettingsCache
from .transforms import (
    CenterCrop,
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    make_image_list,
    to_float_array,
    to_pil_image,
)


class VQKDImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    interpolation: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    seed: int


logger = logging.getLogger(__name__)
# Normalisation that processors of earlier versions saved: they mapped the pixels to [-1, 1] for VQ-KD, which the
# tokenizer now does itself.
_EARLIER_VERSION_NORMALISATION = [0.5, 0.5, 0.5]


class VQKDImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for the VQ-KD tokenizer: plain [0, 1] pixels by default, which `VQKDModel` maps to its encoder's
    [-1, 1] itself (and a teacher normalises its own way).

    - Evaluation (default), the reference's validation transform: the shorter side resized to
      `int(image_size / crop_pct)`, then the central `image_size` square.
    - Training (`do_augment=True`): RandomResizedCrop(`image_size`, `crop_scale`, `crop_ratio`) then a horizontal
      flip with probability 0.5, the VQ-KD training recipe.

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
        seed (`int` or `numpy.random.Generator`, *optional*): Seed of the augmentation RNG (not saved; independent
            per DataLoader worker, see `ProcessLocalRNG`).

    Settings can be changed afterwards (`processor.image_size = 112`) or for one call (`processor(images,
    image_size=112)`), as with transformers' processors.

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
        seed: int | np.random.Generator | None = None,
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
        self._rng = ProcessLocalRNG(seed)
        self._flip = RandomHorizontalFlip(0.5)
        # Built from the settings at use time, so attribute changes and per-call settings take effect.
        self._views = SettingsCache(_VIEW_SETTINGS, _build_views)
        self._views.get(self)  # bad settings fail here rather than at the first image

    def set_seed(self, seed: int | np.random.Generator | None) -> None:
        """Restarts the augmentation RNG from `seed`."""
        self._rng = ProcessLocalRNG(seed)

    def to_dict(self) -> dict[str, Any]:
        # Private attributes are runtime state (RNG, transform objects) rebuilt from the public settings.
        return {key: value for key, value in super().to_dict().items() if not key.startswith("_")}

    def preprocess(
        self, images, do_augment: bool = False, return_tensors: str | None = None, **settings
    ) -> BatchFeature:
        """
        Args:
            images: One image or a list/batch of images (PIL, numpy, torch).
            do_augment (`bool`, defaults to `False`): Training augmentation instead of the evaluation crop.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any constructor setting except `seed` (e.g. `image_size=112`), for this call only.
        """
        mean = np.asarray(settings.pop("image_mean", self.image_mean), dtype=np.float32)[:, None, None]
        std = np.asarray(settings.pop("image_std", self.image_std), dtype=np.float32)[:, None, None]
        views = self._views.get(self, **settings)
        rng = self._rng.generator
        pixel_values = []
        for raw in make_image_list(images):
            image = to_pil_image(raw)
            if do_augment:
                image = self._flip(views.training_crop(image, rng), rng)
            else:
                image = views.evaluation_view(image)
            pixel_values.append((to_float_array(image) - mean) / std)
        if return_tensors is not None:
            pixel_values = np.stack(pixel_values)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


@dataclass(frozen=True)
class _Views:
    training_crop: RandomResizedCrop
    evaluation_view: Compose


# What `_build_views` reads; `image_mean`/`image_std` are applied directly in `preprocess`.
_VIEW_SETTINGS = ("image_size", "interpolation", "crop_scale", "crop_ratio", "crop_pct")


def _build_views(
    image_size: int,
    interpolation: str,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    crop_pct: float | None,
) -> _Views:
    if crop_pct is None:
        crop_pct = 224 / 256 if image_size < 384 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return _Views(
        training_crop=RandomResizedCrop(int(image_size), tuple(crop_scale), tuple(crop_ratio), interpolation),
        evaluation_view=Compose([Resize(int(image_size / crop_pct), interpolation), CenterCrop(int(image_size))]),
    )
