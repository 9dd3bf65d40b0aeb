"""The pixel decoder's yardstick, which needs no network: paint every patch with the mean patch of its code.

`run_pixel_decoder.py` accumulates, over training images, the sum of the [0, 1] pixel patches that each VQ-KD code
was given; the mean patch of a code is the best constant a decoder that sees only that one code could paint (under
the squared error that PSNR measures). A decoder that also reads the neighbouring codes should do better.

    baseline = MeanPatchBaseline(codebook_size=8192, patch_size=16, patch_grid=(14, 14))
    for pixel_values, codes in batches:          # (B, 3, 224, 224) in [0, 1], (B, 196)
        baseline.update(pixel_values, codes)
    baseline.all_reduce(accelerator)             # with several processes
    painted = baseline.paint(codes)              # (B, 3, 224, 224)
    psnr(painted, pixel_values)                  # (B,) dB
"""

from __future__ import annotations

from typing import Any

import torch

# The squared error below which PSNR is capped: a perfect reconstruction scores 100 dB, not infinity, so that
# averages over images stay finite.
MIN_MEAN_SQUARED_ERROR = 1e-10


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, channels, H, W)` -> `(batch, (H / p) * (W / p), channels * p * p)`, patches in row-major order
    (the order of the tokenizer's codes)."""
    batch, channels, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Images of {height}x{width} pixels do not split into {patch_size}x{patch_size} patches.")
    rows, cols = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * patch_size * patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, patch_grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: `(batch, rows * cols, channels * p * p)` -> `(batch, channels, H, W)`."""
    rows, cols = patch_grid
    pixels = patches.reshape(-1, rows, cols, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return pixels.reshape(-1, channels, rows * patch_size, cols * patch_size)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image, in dB, for [0, 1] pixels: `10 log10(1 / MSE)` with the mean squared
    error over the image's pixels and channels (capped at 100 dB for a perfect match).

    Args:
        prediction, target (`torch.Tensor` of shape `(batch, channels, H, W)`): images in [0, 1].

    Returns:
        `torch.FloatTensor` of shape `(batch,)`.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape.")
    squared_error = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return -10 * torch.log10(squared_error.clamp(min=MIN_MEAN_SQUARED_ERROR))


class MeanPatchBaseline:
    """Per-code sums and counts of pixel patches, and the images painted with the per-code mean patches.

    Codes never seen in the accumulated images get the mean patch of all the patches seen (the global mean patch).

    Args:
        codebook_size: number of codes of the tokenizer.
        patch_size: side of the patch each code stands for.
        patch_grid: (rows, columns) of codes per image.
        num_channels: channels of the images.
        device: where the sums live (the device of the images and codes given to :meth:`update`).
    """

    def __init__(
        self,
        codebook_size: int,
        patch_size: int,
        patch_grid: tuple[int, int],
        num_channels: int = 3,
        device: torch.device | str | None = None,
    ) -> None:
        self.codebook_size, self.patch_size, self.num_channels = codebook_size, patch_size, num_channels
        rows, cols = patch_grid  # kept as a tuple, whatever sequence it came as
        self.patch_grid = (rows, cols)
        # fp32 sums of at most ~1e7 values in [0, 1] per code keep about 6 significant digits: ample for a mean.
        self.sums = torch.zeros(codebook_size, num_channels * patch_size**2, device=device)
        self.counts = torch.zeros(codebook_size, device=device)
        self._table: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        """Patches accumulated so far (on this process, or on all of them after :meth:`all_reduce`)."""
        return int(self.counts.sum().item())

    @property
    def num_seen_codes(self) -> int:
        """Codes that were given at least one patch."""
        return int((self.counts > 0).sum().item())

    @torch.no_grad()
    def update(self, pixel_values: torch.Tensor, indices: torch.Tensor) -> None:
        """Add the patches of `pixel_values` (`(batch, channels, H, W)` in [0, 1]) to the sums of their codes
        (`indices`, `(batch, rows * cols)` or `(batch, rows, cols)`)."""
        rows, cols = self.patch_grid
        expected = (self.num_channels, rows * self.patch_size, cols * self.patch_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"Expected pixel_values of shape (batch, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}.")  # fmt: skip
        indices = indices.reshape(indices.shape[0], -1)
        if indices.shape != (pixel_values.shape[0], rows * cols):
            raise ValueError(f"Expected codes of shape ({pixel_values.shape[0]}, {rows * cols}), got "
                             f"{tuple(indices.shape)}.")  # fmt: skip
        flat = indices.flatten().to(self.counts.device)
        patches = patchify(pixel_values.float(), self.patch_size).flatten(0, 1).to(self.sums.device)
        self.sums.index_add_(0, flat, patches)
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))
        self._table = None

    def all_reduce(self, accelerator: Any) -> None:
        """Sum the statistics over all processes (a collective: every process must call it)."""
        self.sums = accelerator.reduce(self.sums, reduction="sum")
        self.counts = accelerator.reduce(self.counts, reduction="sum")
        self._table = None

    def patch_table(self) -> torch.Tensor:
        """The mean patch of every code, `(codebook_size, num_channels * patch_size ** 2)`; the global mean patch
        for codes never seen.

        Raises:
            ValueError: no patch was accumulated yet.
        """
        if self._table is None:
            total = self.counts.sum()
            if total.item() == 0:
                raise ValueError("The mean-patch baseline has seen no image yet; call update() first.")
            global_mean = self.sums.sum(dim=0) / total
            seen = self.counts > 0
            means = self.sums / self.counts.clamp(min=1).unsqueeze(1)
            self._table = torch.where(seen.unsqueeze(1), means, global_mean)
        return self._table

    def paint(self, indices: torch.Tensor) -> torch.Tensor:
        """Images `(batch, num_channels, H, W)` with every patch painted in the mean patch of its code
        (`indices`: `(batch, rows * cols)` or `(batch, rows, cols)`)."""
        table = self.patch_table()
        patches = table[indices.reshape(indices.shape[0], -1).to(table.device)]
        return unpatchify(patches, self.patch_size, self.patch_grid, self.num_channels)

    def __repr__(self) -> str:
        return (
            f"MeanPatchBaseline(codebook_size={self.codebook_size}, patch_size={self.patch_size}, "
            f"patch_grid={self.patch_grid}, seen codes={self.num_seen_codes}, patches={self.num_patches})"
        )


__all__ = ["MIN_MEAN_SQUARED_ERROR", "MeanPatchBaseline", "patchify", "psnr", "unpatchify"]
