"""
Image augmentation with PIL and numpy only (no torchvision), drawing randomness from an explicit numpy `Generator`.

Every random transform follows torchvision's sampling rules (torchvision 0.2x, `transforms/transforms.py`,
`transforms/functional_pil.py`) and uses PIL for resampling and colour operations, as torchvision does for PIL
images:

- `RandomResizedCrop.get_params`: 10 attempts at area ~ U(scale) * image area, log-uniform aspect ratio, offset
  uniform over all valid positions; otherwise the central crop clamped to the ratio range. The two-view crop of
  BEiT (`RandomResizedCropAndInterpolationWithTwoPic` in unilm) samples one box this way and resamples it twice.
- `ColorJitter`: factors ~ U[max(0, 1 - x), 1 + x] (hue ~ U[-h, h]), applied in a random order through
  `ImageEnhance.Brightness/Contrast/Color` and an HSV hue shift.
- `RandomErasing`: torchvision's box sampling (scale (0.02, 0.33), ratio (0.3, 3.3), 10 attempts);
  `value="random"` fills with per-pixel normal noise like timm's `mode="pixel"` used by BEiT.

Transforms are callables `transform(image, rng)`; deterministic ones ignore `rng`. `RandAugment` lives in
`rand_augment.py`; the training recipes built from these operations are in `augmentation.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import torch

_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}

# Modes whose transparency we composite over white, so transparent regions do not turn into arbitrary colours.
_ALPHA_MODES = ("LA", "RGBA", "PA", "La", "RGBa")


def resample_filter(interpolation: str | int) -> PIL.Image.Resampling:
    """Maps "nearest" | "bilinear" | "bicubic" | "lanczos" | "box" | "hamming" (or a PIL constant) to PIL's filter."""
    if isinstance(interpolation, str):
        if interpolation not in _RESAMPLE:
            raise ValueError(f"Unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}")
        return _RESAMPLE[interpolation]
    return PIL.Image.Resampling(interpolation)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """`int` -> square; `(height, width)` otherwise."""
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size}")
    return int(size[0]), int(size[1])


def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    Converts a PIL image of any common mode to 8-bit RGB.

    - `1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `RGB`: PIL's own conversion.
    - `LA`, `RGBA`, `PA` and `P` with a transparency entry: composited over white.
    - `I;16*` and `I` (16-bit PNGs, TIFFs): read as 16-bit intensities, 0..65535 -> 0..255.
    - `F` (float TIFFs): read as intensities in [0, 1], clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values / 257.0 if mode.startswith("I") else values * 255.0
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert an image of mode {mode!r} to RGB: {error}") from error


_CHANNEL_FORMATS = ("channels_first", "channels_last")


def _channels_last(image: np.ndarray, input_data_format: str | None) -> np.ndarray:
    """`(H, W)` stays; a 3-D array becomes `(H, W, C)`. Without `input_data_format` ("channels_first" or
    "channels_last", or transformers' `ChannelDimension`), channels-first is assumed when the first axis has 1, 3 or
    4 entries and the last does not."""
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ValueError(f"Expected an image of shape (H, W), (H, W, C) or (C, H, W), got {image.shape}")
    if input_data_format is None:
        channels_first = image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4)
    else:
        # transformers' ChannelDimension is a str enum: its value is the plain string.
        input_data_format = str(getattr(input_data_format, "value", input_data_format))
        if input_data_format not in _CHANNEL_FORMATS:
            raise ValueError(f"input_data_format must be one of {_CHANNEL_FORMATS} or None, got {input_data_format!r}")
        channels_first = input_data_format == "channels_first"
    return image.transpose(1, 2, 0) if channels_first else image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit pixels of an array: floats must be in [0, 1], uint16 is 16-bit, other integers must be in [0, 255]."""
    if np.issubdtype(image.dtype, np.floating):
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            raise ValueError(f"Float images must hold values in [0, 1], got values in [{low}, {high}]")
        return np.round(image * 255.0).astype(np.uint8)
    if image.dtype == np.uint16:
        return np.round(image / 257.0).astype(np.uint8)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"Integer images must hold values in [0, 255], got values in [{low}, {high}]")
        return image.astype(np.uint8)
    return image


def _as_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    return image


def to_pil_image(image, input_data_format: str | None = None) -> PIL.Image.Image:
    """
    Converts a PIL image, numpy array or torch tensor to an RGB PIL image.

    Arrays may be `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}: `input_data_format`
    ("channels_first" / "channels_last") says which; without it, channels-first is assumed when the first axis has
    1, 3 or 4 entries and the last does not. Integer arrays are 8-bit (uint16 is read as 16-bit); float arrays must
    hold values in [0, 1].
    """
    if isinstance(image, PIL.Image.Image):
        return convert_to_rgb(image)
    image = _channels_last(_as_array(image), input_data_format)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
        raise ValueError(
            f"Expected an image of shape (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {image.shape}"
        )
    return convert_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(_to_uint8(image))))


def to_channel_images(image, input_data_format: str | None = None) -> list[PIL.Image.Image]:
    """
    The channels of an image as it is, without RGB conversion: one 8-bit (mode "L") PIL image per channel, in order
    (e.g. 4 for RGBA input, 1 for grayscale). Arrays follow `to_pil_image`'s layout and dtype rules, with any number
    of channels; a PIL image gives the channels of its mode (a palette image its palette indices, as
    `numpy.asarray` does).
    """
    array = (
        np.asarray(image)
        if isinstance(image, PIL.Image.Image)
        else _channels_last(_as_array(image), input_data_format)
    )
    array = _to_uint8(array)
    planes = [array] if array.ndim == 2 else [array[..., channel] for channel in range(array.shape[-1])]
    return [PIL.Image.fromarray(np.ascontiguousarray(plane)) for plane in planes]


class Compose:
    """Applies transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, rng: np.random.Generator | None = None):
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.transforms})"


class Resize:
    """Resizes the shorter side to `size`, keeping the aspect ratio (torchvision's `Resize(int)` rule)."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.interpolation = interpolation
        self._resample = resample_filter(interpolation)

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> PIL.Image.Image:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        new_size = (self.size, new_long) if width <= height else (new_long, self.size)
        return image if new_size == image.size else image.resize(new_size, self._resample)


class CenterCrop:
    """Crops the centre `(height, width)`; pads with zeros first when the image is smaller (torchvision's rule)."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size, "size")

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> PIL.Image.Image:
        crop_h, crop_w = self.size
        width, height = image.size
        if crop_w > width or crop_h > height:
            padded = PIL.Image.new(image.mode, (max(width, crop_w), max(height, crop_h)))
            padded.paste(image, ((max(width, crop_w) - width) // 2, (max(height, crop_h) - height) // 2))
            image, (width, height) = padded, padded.size
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return image.crop((left, top, left + crop_w, top + crop_h))


class RandomHorizontalFlip:
    """Mirrors the image left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < self.p else image


class RandomResizedCrop:
    """
    Crops a random box (area fraction in `scale`, aspect ratio width / height in `ratio`) and resizes it to `size`.

    Args:
        size (`int` or `(height, width)`): Output size.
        scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Range of the box area relative to the image.
        ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Range of the box aspect ratio, sampled log-uniformly.
        interpolation (`str`, defaults to "bicubic"): PIL resampling filter name.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ):
        self.size = _pair(size, "size")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self._resample = resample_filter(interpolation)

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Samples a box `(top, left, height, width)` inside a `width` x `height` image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            box_w = int(round(math.sqrt(target_area * aspect)))
            box_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < box_w <= width and 0 < box_h <= height:
                top = int(rng.integers(0, height - box_h + 1))
                left = int(rng.integers(0, width - box_w + 1))
                return top, left, box_h, box_w
        # Fallback: the largest central box whose aspect ratio is inside the range.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            box_w, box_h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            box_w, box_h = int(round(height * max(self.ratio))), height
        else:
            box_w, box_h = width, height
        return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w

    @staticmethod
    def resized_crop(image: PIL.Image.Image, box, size: tuple[int, int], resample) -> PIL.Image.Image:
        """Crops `box = (top, left, height, width)` then resizes to `size = (height, width)`, as torchvision does."""
        top, left, box_h, box_w = box
        crop = image.crop((left, top, left + box_w, top + box_h))
        return crop.resize((size[1], size[0]), resample)

    def apply_box(self, image: PIL.Image.Image, box: tuple[int, int, int, int]) -> PIL.Image.Image:
        """Resamples a given box `(top, left, height, width)` (e.g. a central one for evaluation) to the output."""
        return self.resized_crop(image, box, self.size, self._resample)

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator):
        return self.apply_box(image, self.get_params(*image.size, rng))


class TwoViewRandomResizedCrop(RandomResizedCrop):
    """
    One random crop box resampled twice: once to `size` with `interpolation` (the backbone view) and once to
    `second_size` with `second_interpolation` (the tokenizer view), as BEiT's pretraining pipeline does.

    Returns:
        `tuple[PIL.Image.Image, PIL.Image.Image]`: the two views of the same box.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        second_size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        second_interpolation: str = "lanczos",
    ):
        super().__init__(size, scale, ratio, interpolation)
        self.second_size = _pair(second_size, "second_size")
        self.second_interpolation = second_interpolation
        self._second_resample = resample_filter(second_interpolation)

    def apply_box(  # type: ignore[override]  # both views: `__call__` hands back whatever this returns
        self, image: PIL.Image.Image, box: tuple[int, int, int, int]
    ) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """Resamples one box `(top, left, height, width)` to both views."""
        return (
            self.resized_crop(image, box, self.size, self._resample),
            self.resized_crop(image, box, self.second_size, self._second_resample),
        )


def _adjust_hue(image: PIL.Image.Image, hue_factor: float) -> PIL.Image.Image:
    """Rotates the hue by `hue_factor` of a full turn (in [-0.5, 0.5]) in PIL's 8-bit HSV space."""
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, dtype=np.int16) + int(round(hue_factor * 255))) % 256
    hue = PIL.Image.fromarray(shifted.astype(np.uint8), mode="L")
    return PIL.Image.merge("HSV", (hue, saturation, value)).convert("RGB")


class ColorJitter:
    """
    Random brightness, contrast, saturation (and optionally hue), applied in a random order.

    Args:
        brightness, contrast, saturation (`float`): Factor drawn from U[max(0, 1 - x), 1 + x]; 0 disables it.
        hue (`float`, defaults to 0): Hue shift drawn from U[-hue, hue], with `hue` in [0, 0.5]; 0 disables it.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        order = rng.permutation(4)
        factors = [
            rng.uniform(max(0.0, 1 - x), 1 + x) if x > 0 else None
            for x in (self.brightness, self.contrast, self.saturation)
        ]
        factors.append(rng.uniform(-self.hue, self.hue) if self.hue > 0 else None)
        for index in order:
            factor = factors[index]
            if factor is None:
                continue
            if index == 0:
                image = PIL.ImageEnhance.Brightness(image).enhance(factor)
            elif index == 1:
                image = PIL.ImageEnhance.Contrast(image).enhance(factor)
            elif index == 2:
                image = PIL.ImageEnhance.Color(image).enhance(factor)
            else:
                image = _adjust_hue(image, factor)
        return image


class RandomErasing:
    """
    Erases one random rectangle of a `(C, H, W)` float array (applied after normalisation), with probability `p`.

    Args:
        p (`float`, defaults to 0.25): Probability of erasing (BEiT fine-tuning uses 0.25).
        scale (`tuple[float, float]`, defaults to `(0.02, 1/3)`): Range of the erased area relative to the image.
        ratio (`tuple[float, float]`, defaults to `(0.3, 3.3)`): Range of the aspect ratio, sampled log-uniformly.
        value (`float` or "random", defaults to "random"): Fill value, or per-pixel standard normal noise.
    """

    def __init__(
        self,
        p: float = 0.25,
        scale: tuple[float, float] = (0.02, 1 / 3),
        ratio: tuple[float, float] = (0.3, 3.3),
        value: float | str = "random",
    ):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if isinstance(value, str) and value != "random":
            raise ValueError(f"value must be a number or 'random', got {value!r}")
        self.p, self.scale, self.ratio, self.value = p, tuple(scale), tuple(ratio), value

    def __call__(self, pixel_values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if pixel_values.ndim != 3:
            raise ValueError(f"RandomErasing expects a (C, H, W) array, got shape {pixel_values.shape}")
        if rng.random() >= self.p:
            return pixel_values
        channels, height, width = pixel_values.shape
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            erase_area = height * width * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            box_h = int(round(math.sqrt(erase_area * aspect)))
            box_w = int(round(math.sqrt(erase_area / aspect)))
            if not (box_h < height and box_w < width):
                continue
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            erased = pixel_values.copy()
            fill: np.ndarray | float
            if self.value == "random":
                fill = rng.standard_normal((channels, box_h, box_w))
            else:
                fill = cast(float, self.value)  # a number: `__init__` admits no other string
            erased[:, top : top + box_h, left : left + box_w] = fill
            return erased
        return pixel_values


def make_image_list(images) -> list:
    """Splits the accepted inputs into a list of single images: one image, a list/tuple, or a 4-D array/tensor."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("Got an empty list of images")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square `(top, left, side, side)`; resizing it equals "resize shorter side, then center crop"."""
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def to_float_array(image: PIL.Image.Image | Sequence[PIL.Image.Image]) -> np.ndarray:
    """RGB PIL image -> `(3, H, W)` float32 array in [0, 1]; a list of single-channel images (`to_channel_images`)
    -> `(C, H, W)`."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.stack([np.asarray(plane, dtype=np.float32) for plane in image]) / 255.0
