"""Configuration of the BEiT v2 masked-image-modeling model (and BEiT v1 MIM with aggregation off)."""

from __future__ import annotations

from typing import Any, cast

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig

# One table for the named sizes. `early_layers` is depth - 3 as in the released models.
BEITV2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, early_layers=9),
    "small": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, early_layers=9
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, early_layers=9
    ),
    "large": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        early_layers=21,
        layer_scale_init_value=1e-5,
    ),
}


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return cast(tuple[int, int], tuple(value)) if isinstance(value, (list, tuple)) else (value, value)


@strict
class BeitV2Config(BeitConfig):
    r"""
    Configuration of [`BeitV2ForMaskedImageModeling`] and its backbone [`BeitV2Model`].

    It extends transformers' `BeitConfig` (every backbone option keeps its meaning) and changes the defaults to
    BEiT v2 base pretraining: a [MASK] embedding, one relative position bias shared by all layers, no absolute
    position embedding, layer scale 0.1, LayerNorm eps 1e-6, a vocabulary of 8192 visual tokens, no drop path.
    `use_mean_pooling` must keep its default `True`: the MIM model applies the final LayerNorm itself, and
    `BeitModel` would otherwise add a second one.

    Args:
        use_patch_aggregation (`bool`, defaults to `True`):
            Add the patch-aggregation head of BEiT v2: `head_layers` extra blocks that see the last layer's [CLS]
            together with the patch tokens after `early_layers` blocks, and predict the masked tokens a second
            time. Set to `False` for BEiT v1 masked image modeling.
        early_layers (`int`, defaults to 9):
            Which block's output feeds the aggregation head: the output of the first `early_layers` blocks
            (`hidden_states[early_layers]`). Must lie in `[1, num_hidden_layers - 1]`.
        head_layers (`int`, defaults to 2):
            Number of Transformer blocks in the aggregation head.
        shared_lm_head (`bool`, defaults to `True`):
            Reuse the final LayerNorm and `lm_head` of the main branch for the aggregation head.

    Example:

    ```python
    >>> from modeling_beitv2 import BeitV2Config
    >>> config = BeitV2Config.from_preset("large")
    >>> config.num_hidden_layers, config.early_layers
    (24, 21)
    ```"""

    model_type = "beitv2"

    use_mask_token: bool = True
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = True
    layer_scale_init_value: float = 0.1
    layer_norm_eps: float = 1e-6
    drop_path_rate: float | int = 0.0
    use_patch_aggregation: bool = True
    early_layers: int = 9
    head_layers: int = 2
    shared_lm_head: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # Checked here rather than in a `validate_*` hook so that users get a plain `ValueError`.
        image_size, patch_size = _as_pair(self.image_size), _as_pair(self.patch_size)
        if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
            # transformers' BeitRelativePositionBias swaps height and width when it reshapes the bias table, so a
            # non-square patch grid would silently get a scrambled bias.
            raise ValueError(
                f"image_size {self.image_size} and patch_size {self.patch_size} must be square: the relative "
                "position bias of transformers' BEiT only supports square patch grids."
            )
        if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size."
            )
        if not self.use_mean_pooling:
            # BeitModel would then add its own final LayerNorm: tokens normalised twice, and no native export.
            raise ValueError(
                f"use_mean_pooling={self.use_mean_pooling} is not supported: BEiT v2 pretraining has no such option, "
                "the MIM backbone applies the final LayerNorm itself. Leave use_mean_pooling=True."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}."
            )
        if self.use_patch_aggregation:
            if not 1 <= self.early_layers <= self.num_hidden_layers - 1:
                raise ValueError(
                    f"early_layers must lie in [1, num_hidden_layers - 1] = [1, {self.num_hidden_layers - 1}], "
                    f"got {self.early_layers}."
                )
            if self.head_layers < 1:
                raise ValueError(f"head_layers must be at least 1, got {self.head_layers}.")
        super().__post_init__(**kwargs)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid at `image_size`."""
        image_size, patch_size = _as_pair(self.image_size), _as_pair(self.patch_size)
        return image_size[0] // patch_size[0], image_size[1] // patch_size[1]

    @property
    def num_patches(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BeitV2Config:
        """Build a config from a named size (`tiny`, `small`, `base`, `large`) plus keyword overrides."""
        if name not in BEITV2_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(BEITV2_PRESETS)}.")
        return cls(**{**BEITV2_PRESETS[name], **overrides})
