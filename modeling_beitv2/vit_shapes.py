"""The architecture of a unilm / timm ViT checkpoint, read from its tensor shapes and its file name.

The weights store depth, width, MLP width, patch size, and (in their position tables) the grid and, where a relative
position bias table exists, the number of heads. What they do not store comes from the released file naming
(`beitv2_base_patch16_224_pt1k.pth`) looked up in the preset tables, from explicit arguments, or from the released
models' conventions (64-wide heads).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .configuration_beitv2 import BEITV2_PRESETS, BeitV2Config

_RELEASED_NAME = re.compile(
    rf"(?P<family>beitv2|beit)_(?P<size>{'|'.join(BEITV2_PRESETS)})_patch(?P<patch>\d+)_(?P<image>\d+)"
)


@dataclass
class NamePreset:
    """What a released checkpoint's file name tells beyond its shapes (`beitv2_base_patch16_224_pt1k.pth`)."""

    family: str | None = None  # "beitv2" or "beit"
    size: str | None = None  # a key of BEITV2_PRESETS
    patch_size: int | None = None
    image_size: int | None = None

    @classmethod
    def from_name(cls, name: str | os.PathLike) -> NamePreset:
        """The preset a file name spells out; every field `None` for a name outside the released naming."""
        match = _RELEASED_NAME.search(Path(name).name.lower())
        if match is None:
            return cls()
        return cls(match["family"], match["size"], int(match["patch"]), int(match["image"]))


@dataclass
class ViTShapes:
    """Architecture of a unilm/timm ViT read from its weights (keys relative to `prefix`)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    patch_size: int
    num_channels: int
    grid_size: int | None  # patches per side, when a position table reveals it
    num_attention_heads: int | None  # when a relative position bias table reveals it
    layer_scale: bool
    absolute_position_embeddings: bool
    shared_relative_position_bias: bool
    per_layer_relative_position_bias: bool


def _grid_from_relative_table(num_rows: int, key: str) -> int:
    # A table for a g x g grid has (2g - 1)^2 rows plus 3 for the cls-to-token, token-to-cls and cls-to-cls terms.
    side = math.isqrt(num_rows - 3)
    if side * side != num_rows - 3 or side % 2 == 0:
        raise ValueError(f"{key} has {num_rows} rows, which is not (2g - 1)^2 + 3 for a square g x g grid.")
    return (side + 1) // 2


def infer_vit_shapes(state_dict: dict[str, torch.Tensor], prefix: str = "") -> ViTShapes:
    """Read depth, width, MLP width, patch size and (when stored) grid and head count of a unilm/timm ViT."""
    projection = state_dict.get(f"{prefix}patch_embed.proj.weight")
    if projection is None:
        raise ValueError(
            f"No {prefix}patch_embed.proj.weight in the checkpoint: this is not a unilm/timm BEiT layout "
            f"(first keys: {sorted(state_dict)[:8]})."
        )
    block_pattern = re.compile(rf"^{re.escape(prefix)}blocks\.(\d+)\.")
    block_ids = {int(m.group(1)) for k in state_dict if (m := block_pattern.match(k))}
    if not block_ids:
        raise ValueError(f"No {prefix}blocks.* keys in the checkpoint.")
    if block_ids != set(range(len(block_ids))):
        raise ValueError(f"Block indices under {prefix}blocks are not contiguous: {sorted(block_ids)}")
    hidden_size, num_channels, patch_size, patch_width = projection.shape
    if patch_size != patch_width:
        raise ValueError(f"Only square patches are supported, got a {patch_size}x{patch_width} patch embedding.")

    grid_size = None
    num_heads = None
    position_embeddings = state_dict.get(f"{prefix}pos_embed")
    if position_embeddings is not None:
        num_patches = position_embeddings.shape[1] - 1
        grid_size = math.isqrt(num_patches)
        if grid_size * grid_size != num_patches:
            raise ValueError(f"{prefix}pos_embed holds {num_patches} patch positions, not a square grid.")
    shared_table_key = f"{prefix}rel_pos_bias.relative_position_bias_table"
    per_layer_table_key = f"{prefix}blocks.0.attn.relative_position_bias_table"
    for key in (shared_table_key, per_layer_table_key):
        if key in state_dict:
            table = state_dict[key]
            table_grid = _grid_from_relative_table(table.shape[0], key)
            if grid_size is not None and table_grid != grid_size:
                raise ValueError(f"{key} is for a {table_grid}x{table_grid} grid but pos_embed for {grid_size}.")
            grid_size, num_heads = table_grid, table.shape[1]
    return ViTShapes(
        hidden_size=hidden_size,
        num_hidden_layers=len(block_ids),
        intermediate_size=state_dict[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch_size,
        num_channels=num_channels,
        grid_size=grid_size,
        num_attention_heads=num_heads,
        layer_scale=f"{prefix}blocks.0.gamma_1" in state_dict,
        absolute_position_embeddings=position_embeddings is not None,
        shared_relative_position_bias=shared_table_key in state_dict,
        per_layer_relative_position_bias=per_layer_table_key in state_dict,
    )


def resolve_num_heads(
    shapes: ViTShapes,
    preset: NamePreset,
    override: int | None,
    what: str,
    sizes: Mapping[str, Mapping[str, Any]] = BEITV2_PRESETS,
) -> int:
    """Heads from the override, else the relative bias table, else the named size in `sizes` (when its width
    matches), else 64-wide heads as in every released model."""
    named = sizes.get(preset.size) if preset.size is not None else None
    if override is not None:
        if shapes.num_attention_heads is not None and override != shapes.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={override} contradicts the {what} checkpoint, whose relative position bias "
                f"table has {shapes.num_attention_heads} heads."
            )
        heads = override
    elif shapes.num_attention_heads is not None:
        heads = shapes.num_attention_heads
    elif named is not None and named["hidden_size"] == shapes.hidden_size:
        heads = named["num_attention_heads"]
    else:
        heads = max(1, shapes.hidden_size // 64)
    if shapes.hidden_size % heads:
        raise ValueError(f"{what}: hidden size {shapes.hidden_size} is not divisible by {heads} attention heads.")
    return heads


def resolve_image_size(shapes: ViTShapes, preset: NamePreset, override: int | None, what: str) -> int:
    """Image size from the stored grid; `override` (or the file name) must agree with it when the grid is known."""
    requested = override if override is not None else preset.image_size
    if shapes.grid_size is None:
        return requested if requested is not None else 224
    stored = shapes.grid_size * shapes.patch_size
    if override is not None and override != stored:
        raise ValueError(
            f"image_size={override} does not match the {what} checkpoint, whose position tables are for "
            f"{shapes.grid_size}x{shapes.grid_size} patches of {shapes.patch_size} px ({stored} px). Resizing "
            "position tables is not part of conversion: convert at the stored size, then fine-tune."
        )
    return stored


def backbone_config_kwargs(shapes: ViTShapes, preset: NamePreset, num_heads: int, image_size: int) -> dict:
    """`BeitConfig` keyword arguments of the backbone that `shapes` describe."""
    # Only non-zero vs zero matters (it decides whether lambda_1/2 exist); the loaded weights overwrite it. The
    # named size's preset value keeps a re-initialised model like the released one (1e-5 for large).
    named_layer_scale = BEITV2_PRESETS.get(preset.size or "", {}).get(
        "layer_scale_init_value", BeitV2Config.layer_scale_init_value
    )
    return dict(
        hidden_size=shapes.hidden_size,
        num_hidden_layers=shapes.num_hidden_layers,
        num_attention_heads=num_heads,
        intermediate_size=shapes.intermediate_size,
        image_size=image_size,
        patch_size=shapes.patch_size,
        num_channels=shapes.num_channels,
        layer_norm_eps=1e-6,
        layer_scale_init_value=named_layer_scale if shapes.layer_scale else 0.0,
        use_absolute_position_embeddings=shapes.absolute_position_embeddings,
        use_relative_position_bias=shapes.per_layer_relative_position_bias,
        use_shared_relative_position_bias=shapes.shared_relative_position_bias,
    )
