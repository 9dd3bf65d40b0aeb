"""
Training augmentations: each recipe is a small frozen dataclass of its settings, called as `augmentation(image, rng)`
with an explicit `numpy.random.Generator`.

The generator is an argument, not state, so the caller decides where randomness comes from: the pretraining scripts
give every example its own generator (derived from the run seed and the example's position in the stream, which is
what makes a resumed run replay the same crops), the Trainer scripts draw from one generator per process
(`ProcessLocalRNG`). An augmentation holds no random state, so one object can be shared by DataLoader workers,
pickled, compared and printed.

- `TwoViewAugmentation`: masked image modeling (BEiT, BEiT v2): colour jitter, flip, one random resized crop box
  resampled to the backbone view and to the tokenizer view.
- `SingleViewAugmentation`: VQ-KD tokenizer training: random resized crop, flip.
- `ClassificationAugmentation`: fine-tuning: random resized crop, flip, RandAugment (random erasing comes after
  normalisation, so it is a separate `RandomErasing`).
- `SegmentationAugmentation`: semantic segmentation, on an image and its label map together: random rescale, pad,
  random crop, flip.

The image processors build the first two from their saved settings (`processor.training_augmentation()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import PIL.Image

from .rand_augment import RandAugment
from .transforms import (
    ColorJitter,
    RandomHorizontalFlip,
    RandomResizedCrop,
    TwoViewRandomResizedCrop,
    resample_filter,
    to_pil_image,
)


def _float_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    """A `(low, high)` setting as a tuple of floats (processors store lists, which JSON round-trips)."""
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    return float(value[0]), float(value[1])


def _positive_int(value: int, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _set(instance: object, **values: object) -> None:
    # The dataclasses are frozen (settings never change after construction, so the built operations stay valid);
    # `__post_init__` normalises and builds through object.__setattr__, as dataclasses document for this case.
    for name, value in values.items():
        object.__setattr__(instance, name, value)


class _CropSettings(Protocol):
    """The random-resized-crop settings of an augmentation (read-only: the dataclasses are frozen)."""

    @property
    def image_size(self) -> int: ...
    @property
    def crop_scale(self) -> tuple[float, float]: ...
    @property
    def crop_ratio(self) -> tuple[float, float]: ...


def _normalise_crop_settings(augmentation: _CropSettings) -> None:
    """Check and normalise the settings of every random-resized-crop augmentation: `image_size`, `crop_scale`,
    `crop_ratio`."""
    _set(
        augmentation,
        image_size=_positive_int(augmentation.image_size, "image_size"),
        crop_scale=_float_pair(augmentation.crop_scale, "crop_scale"),
        crop_ratio=_float_pair(augmentation.crop_ratio, "crop_ratio"),
    )


def _derived() -> Any:
    """A field built in `__post_init__` from the settings: not an argument, not compared, not printed."""
    return field(init=False, repr=False, compare=False)


@dataclass(frozen=True)
class TwoViewAugmentation:
    """
    The pretraining augmentation of BEiT and BEiT v2 (unilm's `DataAugmentationForBEiT`): ColorJitter (`color_jitter`
    for brightness, contrast and saturation; no hue), a horizontal flip, then ONE random resized crop box
    (`crop_scale`, `crop_ratio`) resampled twice, to the backbone view and to the tokenizer view, so both views show
    the same region. Draws, in order: the colour jitter, the flip, the crop box.

    Args:
        image_size (`int`, defaults to 224): Side of the backbone view.
        tokenizer_image_size (`int`, defaults to 224): Side of the tokenizer view (112 for DALL-E).
        crop_scale (`tuple[float, float]`, defaults to `(0.2, 1.0)`): Area range of the crop box.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the crop box.
        interpolation (`str`, defaults to "bicubic"): Resampling filter of the backbone view.
        tokenizer_interpolation (`str`, defaults to "bicubic"): Resampling filter of the tokenizer view.
        color_jitter (`float`, defaults to 0.4): Brightness/contrast/saturation strength; 0 disables it.
        flip_probability (`float`, defaults to 0.5): Probability of the horizontal flip.

    Calling it as `augmentation(image, rng)` on an image (PIL, numpy or torch; any mode) returns the two views as
    RGB PIL images, `(image_size, image_size)` and `(tokenizer_image_size, tokenizer_image_size)`.
    """

    image_size: int = 224
    tokenizer_image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    tokenizer_interpolation: str = "bicubic"
    color_jitter: float = 0.4
    flip_probability: float = 0.5
    _color_jitter: ColorJitter = _derived()
    _flip: RandomHorizontalFlip = _derived()
    _crop: TwoViewRandomResizedCrop = _derived()

    def __post_init__(self) -> None:
        _normalise_crop_settings(self)
        _set(
            self,
            tokenizer_image_size=_positive_int(self.tokenizer_image_size, "tokenizer_image_size"),
            color_jitter=float(self.color_jitter),
        )
        strength = self.color_jitter
        _set(
            self,
            _color_jitter=ColorJitter(strength, strength, strength),
            _flip=RandomHorizontalFlip(self.flip_probability),
            _crop=TwoViewRandomResizedCrop(
                self.image_size,
                self.tokenizer_image_size,
                self.crop_scale,
                self.crop_ratio,
                self.interpolation,
                self.tokenizer_interpolation,
            ),
        )

    def __call__(self, image, rng: np.random.Generator) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        image = self._flip(self._color_jitter(to_pil_image(image), rng), rng)
        return self._crop(image, rng)


@dataclass(frozen=True)
class _CropAndFlip:
    """
    The settings and operations `SingleViewAugmentation` and `ClassificationAugmentation` share: a RandomResizedCrop
    (`crop_scale`, `crop_ratio`, `interpolation`) to `image_size`, then a horizontal flip. A private base, not
    `SingleViewAugmentation` itself, so that a `ClassificationAugmentation` (which adds RandAugment) is not a
    `SingleViewAugmentation`, the type the VQ-KD processor takes.
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_probability: float = 0.5
    _crop: RandomResizedCrop = _derived()
    _flip: RandomHorizontalFlip = _derived()

    def __post_init__(self) -> None:
        _normalise_crop_settings(self)
        _set(
            self,
            _crop=RandomResizedCrop(self.image_size, self.crop_scale, self.crop_ratio, self.interpolation),
            _flip=RandomHorizontalFlip(self.flip_probability),
        )

    def _crop_and_flip(self, image, rng: np.random.Generator) -> PIL.Image.Image:
        """Draws the crop box, then the flip."""
        return self._flip(self._crop(to_pil_image(image), rng), rng)


@dataclass(frozen=True)
class SingleViewAugmentation(_CropAndFlip):
    """
    The training augmentation of the VQ-KD tokenizer: RandomResizedCrop (`crop_scale`, `crop_ratio`) to
    `image_size`, then a horizontal flip. Draws, in order: the crop box, the flip.

    Args:
        image_size (`int`, defaults to 224): Output side length.
        crop_scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Area range of the crop box.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the crop box.
        interpolation (`str`, defaults to "bicubic"): Resampling filter.
        flip_probability (`float`, defaults to 0.5): Probability of the horizontal flip.

    Calling it as `augmentation(image, rng)` returns an `(image_size, image_size)` RGB PIL image.
    """

    def __call__(self, image, rng: np.random.Generator) -> PIL.Image.Image:
        return self._crop_and_flip(image, rng)


@dataclass(frozen=True)
class ClassificationAugmentation(_CropAndFlip):
    """
    The fine-tuning augmentation of BEiT before normalisation: RandomResizedCrop (`crop_scale`, `crop_ratio`) to
    `image_size`, a horizontal flip, then RandAugment. Random erasing acts on normalised pixels, so it is a separate
    `RandomErasing` applied after this. Draws, in order: the crop box, the flip, RandAugment's operations.

    Args:
        image_size (`int`, defaults to 224): Output side length.
        crop_scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Area range of the crop box.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the crop box.
        interpolation (`str`, defaults to "bicubic"): Resampling filter of the crop.
        flip_probability (`float`, defaults to 0.5): Probability of the horizontal flip.
        rand_augment_num_ops (`int`, defaults to 2): RandAugment operations per image; 0 disables RandAugment.
        rand_augment_magnitude (`int`, defaults to 9): RandAugment magnitude bin.
        rand_augment_magnitude_std (`float`, defaults to 0.5): Gaussian noise on the magnitude (timm's `mstd`).
        rand_augment_num_magnitude_bins (`int`, defaults to 11): Number of magnitude bins. With 11, magnitude 9 is
            the strength of timm's `rand-m9-mstd0.5`, BEiT's fine-tuning recipe (torchvision's default is 31).

    Calling it as `augmentation(image, rng)` returns an `(image_size, image_size)` RGB PIL image.
    """

    rand_augment_num_ops: int = 2
    rand_augment_magnitude: int = 9
    rand_augment_magnitude_std: float = 0.5
    rand_augment_num_magnitude_bins: int = 11
    _rand_augment: RandAugment = _derived()

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(
            self,
            _rand_augment=RandAugment(
                self.rand_augment_num_ops,
                self.rand_augment_magnitude,
                num_magnitude_bins=self.rand_augment_num_magnitude_bins,
                magnitude_std=self.rand_augment_magnitude_std,
            ),
        )

    def __call__(self, image, rng: np.random.Generator) -> PIL.Image.Image:
        return self._rand_augment(self._crop_and_flip(image, rng), rng)


@dataclass(frozen=True)
class SegmentationAugmentation:
    """
    The training augmentation of BEiT's semantic segmentation (mmseg's ADE20K pipeline), applied to an image and
    its label map together: rescale so that the shorter side is `crop_size * s` with `s ~ U(scale_range)` (image
    bilinear, labels nearest), pad to at least `crop_size` (image with black, labels with `ignore_index`), take a
    uniformly random `crop_size` square, flip both horizontally. Draws, in order: the scale, the crop's top, its
    left, the flip. Label reduction (e.g. ADE20K's class 0 -> `ignore_index`) is the caller's, before this.

    Args:
        crop_size (`int`, defaults to 512): Side of the output square.
        scale_range (`tuple[float, float]`, defaults to `(0.5, 2.0)`): Range of the rescale factor `s`.
        ignore_index (`int`, defaults to 255): Label of the padding.
        interpolation (`str`, defaults to "bilinear"): Resampling filter of the image.
        flip_probability (`float`, defaults to 0.5): Probability of the horizontal flip.

    Calling it as `augmentation(image, labels, rng)`, with `labels` an `(H, W)` integer array (or a PIL image) of
    class ids the size of `image`, returns the `(crop_size, crop_size)` RGB PIL image and the `(crop_size,
    crop_size)` int64 label array.
    """

    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    ignore_index: int = 255
    interpolation: str = "bilinear"
    flip_probability: float = 0.5
    _resample: PIL.Image.Resampling = _derived()

    def __post_init__(self) -> None:
        _set(
            self,
            crop_size=_positive_int(self.crop_size, "crop_size"),
            scale_range=_float_pair(self.scale_range, "scale_range"),
            ignore_index=int(self.ignore_index),
            _resample=resample_filter(self.interpolation),
        )
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")

    def __call__(self, image, labels, rng: np.random.Generator) -> tuple[PIL.Image.Image, np.ndarray]:
        image = to_pil_image(image)
        labels = np.asarray(labels)
        if labels.shape != (image.height, image.width):
            raise ValueError(
                f"labels must be an (H, W) map the size of the image, (height, width) = {(image.height, image.width)};"
                f" got shape {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < -(2**31) or labels.max() >= 2**31:
            raise ValueError(f"labels must be integer class ids that fit in int32, got dtype {labels.dtype}")
        size = self.crop_size
        scale = size * rng.uniform(*self.scale_range) / min(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, self._resample)
        # An int32 array becomes PIL's 32-bit integer mode "I", which keeps any class id through the resize.
        label_image = PIL.Image.fromarray(labels.astype(np.int32))
        labels = np.asarray(label_image.resize(new_size, PIL.Image.Resampling.NEAREST), dtype=np.int64)
        pad_h, pad_w = max(0, size - new_size[1]), max(0, size - new_size[0])
        pixels = np.pad(np.asarray(image), ((0, pad_h), (0, pad_w), (0, 0)))
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        top = int(rng.integers(0, pixels.shape[0] - size + 1))
        left = int(rng.integers(0, pixels.shape[1] - size + 1))
        pixels, labels = pixels[top : top + size, left : left + size], labels[top : top + size, left : left + size]
        if rng.random() < self.flip_probability:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        return PIL.Image.fromarray(np.ascontiguousarray(pixels)), np.ascontiguousarray(labels)
