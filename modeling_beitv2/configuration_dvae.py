"""Configuration of the DALL-E discrete VAE, the visual tokenizer of BEiT (v1)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class DVAEConfig(PreTrainedConfig):
    r"""
    Configuration of [`DVAEModel`]. The defaults are the released DALL-E dVAE (`encoder.pkl` / `decoder.pkl`):
    8192 codes, 112 px images (BEiT's tokenizer view) -> a 14x14 grid of codes.

    Args:
        codebook_size (`int`, defaults to 8192): number of codes (visual tokens).
        hidden_size (`int`, defaults to 256): `n_hid` of DALL-E; the groups are 1, 2, 4 and 8 times as wide.
        num_blocks_per_group (`int`, defaults to 2): residual blocks in each of the 4 groups.
        num_channels (`int`, defaults to 3): image channels.
        decoder_init_channels (`int`, defaults to 128): `n_init` of the DALL-E decoder.
        image_size (`int`, defaults to 112): input size; the code grid is `image_size // 8` per side.
        logit_laplace_eps (`float`, defaults to 0.1): the `eps` of DALL-E's `map_pixels` / `unmap_pixels`.
    """

    model_type = "beit_dvae"

    codebook_size: int = 8192
    hidden_size: int = 256
    num_blocks_per_group: int = 2
    num_channels: int = 3
    decoder_init_channels: int = 128
    image_size: int = 112
    logit_laplace_eps: float = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x poolings), got {self.image_size}.")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4, got {self.hidden_size}.")
        if self.num_blocks_per_group < 1:
            raise ValueError(f"num_blocks_per_group must be at least 1, got {self.num_blocks_per_group}.")
        if not 0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must lie in [0, 0.5), got {self.logit_laplace_eps}.")
        super().__post_init__(**kwargs)

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.image_size // 8
        return side, side

    @property
    def num_patches(self) -> int:
        return (self.image_size // 8) ** 2
