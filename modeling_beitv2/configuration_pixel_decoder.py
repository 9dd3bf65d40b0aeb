"""Configuration of the pixel decoder that turns VQ-KD codes back into images."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

PIXEL_LOSSES = ("mse", "l1")


@strict
class VQKDPixelDecoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`VQKDPixelDecoder`], which maps a grid of VQ-KD codes to [0, 1] pixels.

    The first four settings describe the frozen tokenizer the decoder belongs to and are copied from it by
    [`VQKDPixelDecoder.from_tokenizer`]; the others size the decoder itself.

    Args:
        codebook_size (`int`, defaults to 8192): number of codes of the tokenizer.
        code_dim (`int`, defaults to 32): dimension of the tokenizer's (l2-normalised) codes.
        image_size (`int`, defaults to 224): side of the square images the tokenizer reads, and that the decoder
            paints.
        patch_size (`int`, defaults to 16): side of the patch each code stands for; the code grid is
            `image_size // patch_size` per side.
        num_channels (`int`, defaults to 3): channels of the painted images.
        hidden_size (`int`, defaults to 256): width of the Transformer blocks.
        num_hidden_layers (`int`, defaults to 4): number of Transformer blocks.
        num_attention_heads (`int`, defaults to 8): attention heads per block.
        intermediate_size (`int`, defaults to 1024): hidden size of the blocks' MLPs.
        refine_channels (`int`, defaults to 32): width of the convolutional refinement at full resolution that
            removes the seams between patches; 0 leaves it out.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the normal init of the Linear weights and position
            embeddings.
        loss_type (`str`, defaults to `"mse"`): the pixel loss, `"mse"` (what PSNR measures; its optimum is the
            conditional mean of the pixels given the codes) or `"l1"` (the conditional median: sharper edges,
            slightly lower PSNR).

    Example:

    ```python
    >>> from modeling_beitv2 import VQKDPixelDecoderConfig
    >>> config = VQKDPixelDecoderConfig(codebook_size=64, code_dim=8, image_size=32, patch_size=8)
    >>> config.patch_grid, config.num_patches
    ((4, 4), 16)

    ```"""

    model_type = "beitv2_vqkd_pixel_decoder"

    codebook_size: int = 8192
    code_dim: int = 32
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    refine_channels: int = 32
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    loss_type: str = "mse"

    def __post_init__(self, **kwargs: Any) -> None:
        # Checks are here rather than in `validate_*` hooks so that users get a plain `ValueError`.
        for name in ("codebook_size", "code_dim", "image_size", "patch_size", "num_channels", "hidden_size",
                     "intermediate_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("num_hidden_layers", "refine_channels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}.")
        if self.num_hidden_layers and (self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads):
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.loss_type not in PIXEL_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(PIXEL_LOSSES)}; got {self.loss_type!r}.")
        super().__post_init__(**kwargs)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the code grid of one image."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols


__all__ = ["PIXEL_LOSSES", "VQKDPixelDecoderConfig"]
