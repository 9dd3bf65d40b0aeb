"""
Mask generators for masked image modeling.

`BlockwiseMaskGenerator` follows the blockwise masking of BEiT (Bao et al., 2021, Algorithm 1) as the official code
(`microsoft/unilm`, `beit2/masking_generator.py`) implements it; `RandomMaskGenerator` masks uniformly random patches
(the ablation of the BEiT paper, Table 4).
"""

from __future__ import annotations

import math

import numpy as np

from .random_state import ProcessLocalRNG

# Attempts at placing one block before the reference gives up on it.
_BLOCK_ATTEMPTS = 10


def _resolve_grid(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    height, width = (int(v) for v in input_size)
    if height < 1 or width < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    return height, width


def _resolve_num_masking_patches(num_patches: int, mask_ratio: float | None, num_masking_patches: int | None) -> int:
    """A count wins over a ratio; a ratio is rounded to the nearest patch count."""
    if num_masking_patches is None:
        if mask_ratio is None or not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        num_masking_patches = int(round(mask_ratio * num_patches))
    if not 1 <= num_masking_patches < num_patches:
        raise ValueError(
            f"The number of masked patches must be at least 1 and below the number of patches ({num_patches}), "
            f"got {num_masking_patches} (mask_ratio={mask_ratio})"
        )
    return int(num_masking_patches)


class _MaskGenerator:
    """Shared interface: `generator(rng=None)` -> `(H, W)` bool mask, `generator.generate(batch)` -> `(B, H, W)`."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        mask_ratio: float | None,
        num_masking_patches: int | None,
        seed: int | np.random.Generator | None,
    ):
        self.height, self.width = _resolve_grid(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = _resolve_num_masking_patches(self.num_patches, mask_ratio, num_masking_patches)
        # Without a seed, the own generator is made at its first use: drawing OS entropy costs more than building
        # the rest, and generators that are always handed an `rng` (an image processor's, built per call) never
        # need it.
        self._rng = None if seed is None else ProcessLocalRNG(seed)

    def _own_generator(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = ProcessLocalRNG(None)
        return self._rng.generator

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """
        Args:
            rng (`numpy.random.Generator`, *optional*):
                Generator to draw from; defaults to the generator's own (seeded by `seed`, independent per worker).

        Returns:
            `np.ndarray` of shape `(height, width)`, dtype bool: `True` at masked patches, exactly
            `num_masking_patches` of them.
        """
        return self._sample(self._own_generator() if rng is None else rng)

    def generate(self, batch_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Returns `batch_size` independent masks as a `(batch_size, height, width)` bool array."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rng = self._own_generator() if rng is None else rng
        return np.stack([self._sample(rng) for _ in range(batch_size)])

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class BlockwiseMaskGenerator(_MaskGenerator):
    """
    Blockwise masking of BEiT / BEiT v2: rectangles of random area and log-uniform aspect ratio are added until the
    target count is reached; if no block fits any more, random patches top the mask up to exactly the target.

    Faithful to the reference, including: a block's area is uniform between `min_num_patches` and the patches still
    to mask, also when fewer than `min_num_patches` remain (the bounds are then reversed, as Python's
    `random.uniform` allows); a block is strictly narrower and lower than the grid; it may overlap earlier blocks as
    long as it adds at least one and at most the remaining number of patches; up to 10 attempts per block. Block
    positions are uniform over every valid offset, so the last row and column can be masked (blocks touch the
    border less often than the centre; implementations that draw the offset with an exclusive upper bound never
    mask the last row or column).

    Args:
        input_size (`int` or `tuple[int, int]`, defaults to `(14, 14)`):
            Patch grid `(height, width)`: the image size divided by the patch size.
        mask_ratio (`float`, defaults to 0.4):
            Fraction of patches to mask, in (0, 1); rounded to the nearest count. Ignored if `num_masking_patches`
            is given. (The reference recipe asks for 75 of 196 patches, i.e. `num_masking_patches=75`.)
        num_masking_patches (`int`, *optional*):
            Exact number of patches to mask, in [1, num_patches).
        min_num_patches (`int`, defaults to 16):
            Smallest block area drawn.
        max_num_patches (`int`, *optional*):
            Largest block area drawn; defaults to `num_masking_patches` (which may then be below `min_num_patches`,
            e.g. on tiny grids: areas are drawn between the two, as in the reference).
        min_aspect (`float`, defaults to 0.3):
            Smallest block aspect ratio (height / width).
        max_aspect (`float`, *optional*):
            Largest aspect ratio; defaults to `1 / min_aspect`.
        seed (`int` or `numpy.random.Generator`, *optional*):
            Seed of this generator's own random stream (independent per DataLoader worker, see `ProcessLocalRNG`).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        mask_ratio: float = 0.4,
        num_masking_patches: int | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | np.random.Generator | None = None,
    ):
        super().__init__(input_size, mask_ratio, num_masking_patches, seed)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be at least 1, got {min_num_patches}")
        # Only an explicit maximum is checked: by default it is the target count, which may be below the minimum on
        # small grids; the reference then draws areas between the two (reversed bounds) and still works.
        if max_num_patches is not None and self.min_num_patches > self.max_num_patches:
            raise ValueError(
                f"min_num_patches ({self.min_num_patches}) must not exceed max_num_patches ({self.max_num_patches})"
            )
        max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if min_aspect <= 0 or max_aspect is None or max_aspect <= 0:  # None only when min_aspect <= 0
            raise ValueError(f"Aspect ratios must be positive, got min_aspect={min_aspect}, max_aspect={max_aspect}")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(input_size={self.shape}, num_masking_patches={self.num_masking_patches}, "
            f"block area [{self.min_num_patches}, {self.max_num_patches}], "
            f"aspect [{self.min_aspect:.3f}, {self.max_aspect:.3f}])"
        )

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator, blocks: list) -> int:
        """Tries to add one block adding at most `max_new` patches; returns how many patches it added."""
        for _ in range(_BLOCK_ATTEMPTS):
            # low + (high - low) * U, not rng.uniform: the bounds may be reversed (see the class docstring).
            target_area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            aspect = math.exp(self._log_aspect[0] + (self._log_aspect[1] - self._log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                added = h * w - int(region.sum())
                if 0 < added <= max_new:
                    region[...] = True
                    blocks.append((top, left, h, w))
                    return added
        return 0

    def _sample_blocks(self, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """The block phase alone: the mask before top-up and its blocks as `(top, left, height, width)`."""
        mask = np.zeros(self.shape, dtype=bool)
        blocks: list[tuple[int, int, int, int]] = []
        count = 0
        while count < self.num_masking_patches:
            added = self._add_block(mask, min(self.num_masking_patches - count, self.max_num_patches), rng, blocks)
            if added == 0:
                break
            count += added
        return mask, blocks

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        mask, _ = self._sample_blocks(rng)
        # A block never adds more than the patches still missing, so the count can only fall short: top it up.
        missing = self.num_masking_patches - int(mask.sum())
        if missing > 0:
            unmasked = np.flatnonzero(~mask)
            mask.flat[rng.choice(unmasked, size=missing, replace=False)] = True
        return mask


class RandomMaskGenerator(_MaskGenerator):
    """
    Masks `num_masking_patches` patches drawn uniformly without replacement (the random-masking ablation).

    Args:
        input_size (`int` or `tuple[int, int]`, defaults to `(14, 14)`): Patch grid `(height, width)`.
        mask_ratio (`float`, defaults to 0.4): Fraction of patches to mask, in (0, 1).
        num_masking_patches (`int`, *optional*): Exact count; wins over `mask_ratio`.
        seed (`int` or `numpy.random.Generator`, *optional*): Seed of this generator's own random stream.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        mask_ratio: float = 0.4,
        num_masking_patches: int | None = None,
        seed: int | np.random.Generator | None = None,
    ):
        super().__init__(input_size, mask_ratio, num_masking_patches, seed)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(input_size={self.shape}, num_masking_patches={self.num_masking_patches})"

    def _sample(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, size=self.num_masking_patches, replace=False)] = True
        return mask.reshape(self.shape)
