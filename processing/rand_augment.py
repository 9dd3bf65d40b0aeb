"""
RandAugment (Cubuk et al., 2020) with PIL only, drawing from an explicit numpy `Generator`.

`RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)` follows torchvision 0.2x
(`transforms/autoaugment.py`): the 14 operations and their magnitude tables; `magnitude_std > 0` adds timm's Gaussian
magnitude noise (BEiT fine-tuning uses `rand-m9-mstd0.5`).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps


class RandAugment:
    """
    RandAugment (Cubuk et al., 2020) with torchvision's operations and magnitude tables.

    Args:
        num_ops (`int`, defaults to 2): Operations applied per image, each drawn uniformly from the 14.
        magnitude (`int`, defaults to 9): Magnitude bin in [0, num_magnitude_bins).
        num_magnitude_bins (`int`, defaults to 31): Number of magnitude levels.
        magnitude_std (`float`, defaults to 0): If positive, each operation's level is drawn from
            N(magnitude, magnitude_std) and clipped to the bin range (timm's `mstd`).
        fill (`tuple[int, int, int]`, defaults to `(0, 0, 0)`): Colour of the area uncovered by geometric operations.
    """

    operations = (
        "Identity",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
        "Brightness",
        "Color",
        "Contrast",
        "Sharpness",
        "Posterize",
        "Solarize",
        "AutoContrast",
        "Equalize",
    )
    _signed = frozenset(
        ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
    )

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        magnitude_std: float = 0.0,
        fill: tuple[int, int, int] = (0, 0, 0),
    ):
        if num_ops < 0:
            raise ValueError(f"num_ops must be non-negative, got {num_ops}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, num_magnitude_bins={num_magnitude_bins}), got {magnitude}")
        if magnitude_std < 0:
            raise ValueError(f"magnitude_std must be non-negative, got {magnitude_std}")
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.magnitude_std, self.fill = magnitude_std, tuple(fill)

    def _value(self, operation: str, level: float, width: int, height: int) -> float:
        """torchvision's magnitude table entry at `level` (continuous so that magnitude noise can move it)."""
        fraction = level / (self.num_magnitude_bins - 1)
        if operation in ("ShearX", "ShearY"):
            return 0.3 * fraction
        if operation == "TranslateX":
            return 150.0 / 331.0 * width * fraction
        if operation == "TranslateY":
            return 150.0 / 331.0 * height * fraction
        if operation == "Rotate":
            return 30.0 * fraction
        if operation in ("Brightness", "Color", "Contrast", "Sharpness"):
            return 0.9 * fraction
        if operation == "Posterize":
            return 8 - round(level / ((self.num_magnitude_bins - 1) / 4))
        if operation == "Solarize":
            return 255.0 * (1 - fraction)
        return 0.0

    def _apply(self, image: PIL.Image.Image, operation: str, value: float) -> PIL.Image.Image:
        nearest = PIL.Image.Resampling.NEAREST
        affine = PIL.Image.Transform.AFFINE
        if operation == "ShearX":
            return image.transform(image.size, affine, (1, value, 0, 0, 1, 0), nearest, fillcolor=self.fill)
        if operation == "ShearY":
            return image.transform(image.size, affine, (1, 0, 0, value, 1, 0), nearest, fillcolor=self.fill)
        if operation == "TranslateX":
            return image.transform(image.size, affine, (1, 0, -int(value), 0, 1, 0), nearest, fillcolor=self.fill)
        if operation == "TranslateY":
            return image.transform(image.size, affine, (1, 0, 0, 0, 1, -int(value)), nearest, fillcolor=self.fill)
        if operation == "Rotate":
            return image.rotate(value, resample=nearest, fillcolor=self.fill)
        if operation == "Brightness":
            return PIL.ImageEnhance.Brightness(image).enhance(1.0 + value)
        if operation == "Color":
            return PIL.ImageEnhance.Color(image).enhance(1.0 + value)
        if operation == "Contrast":
            return PIL.ImageEnhance.Contrast(image).enhance(1.0 + value)
        if operation == "Sharpness":
            return PIL.ImageEnhance.Sharpness(image).enhance(1.0 + value)
        if operation == "Posterize":
            return PIL.ImageOps.posterize(image, int(value))
        if operation == "Solarize":
            return PIL.ImageOps.solarize(image, value)  # type: ignore[arg-type]  # PIL compares any number with it
        if operation == "AutoContrast":
            return PIL.ImageOps.autocontrast(image)
        if operation == "Equalize":
            return PIL.ImageOps.equalize(image)
        return image

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        for _ in range(self.num_ops):
            operation = self.operations[int(rng.integers(len(self.operations)))]
            level = float(self.magnitude)
            if self.magnitude_std > 0:
                level = float(np.clip(rng.normal(level, self.magnitude_std), 0, self.num_magnitude_bins - 1))
            value = self._value(operation, level, *image.size)
            if operation in self._signed and rng.integers(2):
                value = -value
            image = self._apply(image, operation, value)
        return image
