"""Convert the released BEiT / BEiT v2 checkpoints (microsoft/unilm, timm, DALL-E) to this library's models.

Six kinds of checkpoint are understood (see [`CONVERSION_KINDS`]):

| kind | source | target |
|---|---|---|
| `vqkd` | unilm VQ-KD tokenizers (CLIP or DINO teacher, 1- or 3-layer decoder) | `VQKDModel` |
| `beitv2_pretrain` | unilm BEiT v2 MIM checkpoints (with the patch-aggregation layers) | `BeitV2ForMaskedImageModeling` |
| `beit_pretrain` | unilm BEiT v1 MIM checkpoints | `BeitV2ForMaskedImageModeling` without aggregation |
| `finetuned` | unilm fine-tuned classifiers (BEiT and BEiT v2) | native `BeitForImageClassification` |
| `timm` | timm `beitv2_*` / `beit_*` state dicts | native `BeitForImageClassification` |
| `dalle_dvae` | the DALL-E `encoder.pkl` / `decoder.pkl` pickles | `DVAEModel` |

Every conversion accounts for every key: a source key that no rule consumes, or a key a rule needs and the
checkpoint lacks, raises a `ValueError` that lists them. Keys that only hold derived values (relative position
indices, the frozen teacher of a VQ-KD checkpoint, ...) are dropped by name, never silently.

The architecture is read from tensor shapes (depth, width, MLP width, patch size, grid, codebook size, decoder
depth, number of heads where a relative position bias table reveals it). What the weights do not store comes from
the checkpoint's file name when it follows the released naming (`beitv2_base_patch16_224_...`) or from explicit
arguments (`num_attention_heads`, `early_layers`, `image_size`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor, PreTrainedModel
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)

CONVERSION_KINDS = ("vqkd", "beitv2_pretrain", "beit_pretrain", "finetuned", "timm", "dalle_dvae")

# BEiT v1 (and the unilm default without `--imagenet_default_mean_and_std`) normalises with 0.5 / 0.5, transformers'
# IMAGENET_STANDARD_*; BEiT v2 with IMAGENET_DEFAULT_*.

# Number of heads of the released sizes. All of them use 64-dimensional heads, which is the fallback.
_HEADS_BY_SIZE = {"tiny": 3, "small": 6, "base": 12, "large": 16}
_WIDTH_BY_SIZE = {"tiny": 192, "small": 384, "base": 768, "large": 1024}
_LAYER_SCALE_BY_SIZE = {"large": 1e-5}
_RELEASED_NAME = re.compile(
    r"(?P<family>beitv2|beit)_(?P<size>tiny|small|base|large)_patch(?P<patch>\d+)_(?P<image>\d+)"
)
_VQKD_ENCODER_NAME = re.compile(r"encoder_(?P<size>tiny|small|base|large)")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("model", "module", "state_dict")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file into a flat `{name: tensor}` dict.

    `.safetensors` files are read with safetensors; anything else (`.pth`, `.pt`, `.bin`, `.ckpt`) with
    `torch.load(..., weights_only=True)`. The weights may sit at the top level or under `model`, `module`
    (DeepSpeed) or `state_dict` (first match wins, so a training checkpoint's optimizer state is ignored). A
    `module.` prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(str(path))
    else:
        # Training checkpoints of the reference also pickle their argparse namespace; it only holds plain values.
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(checkpoint, source=str(path))


def unwrap_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the `{name: tensor}` mapping inside a loaded checkpoint (see [`load_state_dict`])."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, expected a dict of tensors.")
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{source}: no weights found under {list(_WRAPPER_KEYS)} nor at the top level; "
            f"these entries are not tensors: {not_tensors[:10]}"
        )
    state_dict = dict(checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


class _PickledModule:
    """Stand-in for every `nn.Module` class stored in the DALL-E pickles: it only keeps the pickled `__dict__`."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# The only classes the DALL-E `encoder.pkl` / `decoder.pkl` files contain besides tensors and containers.
_DALLE_PICKLED_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)


def load_dalle_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the parameters of a pickled DALL-E `Encoder` or `Decoder` without the `dall_e` package.

    The files are whole pickled modules. They are read with `torch.load(weights_only=True)` where each of the
    module classes they contain (and nothing else) is admitted as an inert stand-in that only stores its
    attributes; the parameters are then collected from the stand-ins' `_parameters` / `_modules` the way
    `nn.Module.state_dict` names them (e.g. `blocks.group_1.block_1.res_path.conv_1.w`).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DALL-E pickle {str(path)!r} does not exist or is not a file.")
    stand_ins = [(_PickledModule, name) for name in _DALLE_PICKLED_CLASSES]
    try:
        with torch.serialization.safe_globals(stand_ins):
            root = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler reports a refused class as a generic UnpicklingError
        raise ValueError(f"{str(path)!r} is not a DALL-E encoder/decoder pickle: {error}") from error
    if not isinstance(root, _PickledModule):
        raise ValueError(f"{str(path)!r} holds a {type(root).__name__}, expected a pickled DALL-E module.")

    state_dict: dict[str, torch.Tensor] = {}

    def collect(module: _PickledModule, prefix: str) -> None:
        for name, parameter in module.__dict__.get("_parameters", {}).items():
            if parameter is not None:
                state_dict[prefix + name] = parameter.detach().clone()
        for name, child in module.__dict__.get("_modules", {}).items():
            if child is not None:
                collect(child, f"{prefix}{name}.")

    collect(root, "")
    return state_dict


# ---------------------------------------------------------------------------------------------------------------
# Key accounting
# ---------------------------------------------------------------------------------------------------------------


class KeyAccountant:
    """Hands out the tensors of a source state dict and remembers which were used, missing or left over.

    Conversion code calls [`take`] for every key it maps; keys matching one of `drop_patterns` (regexes) hold
    derived values and count as used. [`finish`] raises a `ValueError` listing the unknown and the missing keys.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], drop_patterns: Iterable[str] = (), source: str = ""):
        self.state_dict = state_dict
        self.source = source
        drop = [re.compile(p) for p in drop_patterns]
        self.used = {k for k in state_dict if any(p.search(k) for p in drop)}
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def take(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (marked as used); a missing key is recorded and a placeholder returned."""
        if key not in self.state_dict:
            self.missing.append(key)
            return torch.empty(0)
        self.used.add(key)
        return self.state_dict[key]

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.state_dict else None

    def finish(self) -> None:
        unknown = sorted(set(self.state_dict) - self.used)
        if unknown or self.missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} unknown key(s): {unknown}")
            if self.missing:
                parts.append(f"{len(self.missing)} missing key(s): {sorted(self.missing)}")
            raise ValueError(f"{self.source or 'checkpoint'} does not match the expected layout; " + "; ".join(parts))


def load_into(model: torch.nn.Module, converted: dict[str, torch.Tensor], what: str) -> None:
    """Copy `converted` into `model`, requiring the exact key set and shapes (persistent entries only)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if converted[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"Converted {what} weights do not fit the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong_shape}"
        )
    model.load_state_dict(converted, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Shape inference
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NamePreset:
    """What a released checkpoint's file name tells beyond its shapes (`beitv2_base_patch16_224_pt1k.pth`)."""

    family: str | None = None  # "beitv2" or "beit"
    size: str | None = None
    patch_size: int | None = None
    image_size: int | None = None

    @classmethod
    def from_name(cls, name: str | os.PathLike) -> NamePreset:
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
    extra: dict[str, Any] = field(default_factory=dict)


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


def resolve_num_heads(shapes: ViTShapes, preset: NamePreset, override: int | None, what: str) -> int:
    """Heads from the override, else the relative bias table, else the released size, else 64-wide heads."""
    if override is not None:
        if shapes.num_attention_heads is not None and override != shapes.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={override} contradicts the {what} checkpoint, whose relative position bias "
                f"table has {shapes.num_attention_heads} heads."
            )
        heads = override
    elif shapes.num_attention_heads is not None:
        heads = shapes.num_attention_heads
    elif preset.size is not None and _WIDTH_BY_SIZE[preset.size] == shapes.hidden_size:
        heads = _HEADS_BY_SIZE[preset.size]
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


def _backbone_config_kwargs(shapes: ViTShapes, preset: NamePreset, num_heads: int, image_size: int) -> dict:
    return dict(
        hidden_size=shapes.hidden_size,
        num_hidden_layers=shapes.num_hidden_layers,
        num_attention_heads=num_heads,
        intermediate_size=shapes.intermediate_size,
        image_size=image_size,
        patch_size=shapes.patch_size,
        num_channels=shapes.num_channels,
        layer_norm_eps=1e-6,
        # Only non-zero vs zero matters (it decides whether lambda_1/2 exist); the loaded weights overwrite it.
        layer_scale_init_value=_LAYER_SCALE_BY_SIZE.get(preset.size or "", 0.1) if shapes.layer_scale else 0.0,
        use_absolute_position_embeddings=shapes.absolute_position_embeddings,
        use_relative_position_bias=shapes.per_layer_relative_position_bias,
        use_shared_relative_position_bias=shapes.shared_relative_position_bias,
    )


# ---------------------------------------------------------------------------------------------------------------
# unilm block -> transformers BEiT layer
# ---------------------------------------------------------------------------------------------------------------


def convert_blocks(
    accountant: KeyAccountant,
    source_prefix: str,
    target_prefix: str,
    num_layers: int,
    layer_scale: bool,
    relative_position_bias: bool = False,
    zero_k_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """Map `{source_prefix}{i}.*` unilm/timm blocks onto `{target_prefix}{i}.*` transformers BEiT layers.

    The fused `attn.qkv.weight` is split into q/k/v; the key projection has no bias (`q_bias` and `v_bias` are
    separate parameters in the source). `zero_k_bias` accepts timm's all-zero `attn.k_bias` buffer.
    """
    out: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        src, dst = f"{source_prefix}{i}.", f"{target_prefix}{i}."
        for norm_src, norm_dst in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for p in ("weight", "bias"):
                out[f"{dst}{norm_dst}.{p}"] = accountant.take(f"{src}{norm_src}.{p}")
        qkv = accountant.take(f"{src}attn.qkv.weight")
        if qkv.numel():
            if qkv.shape[0] % 3:
                raise ValueError(f"{src}attn.qkv.weight has {qkv.shape[0]} rows, not a multiple of 3.")
            q, k, v = qkv.chunk(3, dim=0)
            out[f"{dst}attention.q_proj.weight"] = q
            out[f"{dst}attention.k_proj.weight"] = k
            out[f"{dst}attention.v_proj.weight"] = v
        out[f"{dst}attention.q_proj.bias"] = accountant.take(f"{src}attn.q_bias")
        out[f"{dst}attention.v_proj.bias"] = accountant.take(f"{src}attn.v_bias")
        if zero_k_bias and accountant.has(f"{src}attn.k_bias"):
            k_bias = accountant.take(f"{src}attn.k_bias")
            if k_bias.abs().max() > 0:
                raise ValueError(f"{src}attn.k_bias is not zero; BEiT's key projection has no bias.")
        for p in ("weight", "bias"):
            out[f"{dst}attention.o_proj.{p}"] = accountant.take(f"{src}attn.proj.{p}")
            out[f"{dst}mlp.fc1.{p}"] = accountant.take(f"{src}mlp.fc1.{p}")
            out[f"{dst}mlp.fc2.{p}"] = accountant.take(f"{src}mlp.fc2.{p}")
        if layer_scale:
            out[f"{dst}lambda_1"] = accountant.take(f"{src}gamma_1")
            out[f"{dst}lambda_2"] = accountant.take(f"{src}gamma_2")
        if relative_position_bias:
            out[f"{dst}relative_position_bias.relative_position_bias_table"] = accountant.take(
                f"{src}attn.relative_position_bias_table"
            )
    return out


def convert_patch_embedding(accountant: KeyAccountant, source_prefix: str, target_prefix: str) -> dict:
    return {
        f"{target_prefix}patch_embeddings.projection.{p}": accountant.take(f"{source_prefix}patch_embed.proj.{p}")
        for p in ("weight", "bias")
    }


def _convert_backbone(accountant: KeyAccountant, shapes: ViTShapes, zero_k_bias: bool = False) -> dict:
    """Patch embedding, absolute position embeddings or shared relative position bias table, and the blocks of a
    unilm/timm backbone stored at the top level, mapped under `beit.` (token embeddings are the caller's)."""
    out = convert_patch_embedding(accountant, "", "beit.embeddings.")
    if shapes.absolute_position_embeddings:
        out["beit.embeddings.position_embeddings"] = accountant.take("pos_embed")
    if shapes.shared_relative_position_bias:
        out["beit.shared_position_bias.relative_position_bias_table"] = accountant.take(
            "rel_pos_bias.relative_position_bias_table"
        )
    out.update(
        convert_blocks(
            accountant,
            "blocks.",
            "beit.layers.",
            shapes.num_hidden_layers,
            shapes.layer_scale,
            relative_position_bias=shapes.per_layer_relative_position_bias,
            zero_k_bias=zero_k_bias,
        )
    )
    return out


# Buffers that only hold values derived from the configuration.
_DERIVED_KEYS = (r"relative_position_index$",)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuned classifiers (unilm and timm) -> native BeitForImageClassification
# ---------------------------------------------------------------------------------------------------------------


def convert_classifier(
    state_dict: dict[str, torch.Tensor],
    kind: str = "finetuned",
    *,
    name: str = "",
    num_attention_heads: int | None = None,
    image_size: int | None = None,
    id2label: dict[int, str] | None = None,
) -> BeitForImageClassification:
    """Build a native `BeitForImageClassification` from a unilm (`finetuned`) or timm (`timm`) classifier.

    Mean-pooled models (`fc_norm`) become `use_mean_pooling=True`; [CLS] models (`norm`) `False`. Per-layer,
    shared and absolute position tables are all carried over as stored.
    """
    if kind not in ("finetuned", "timm"):
        raise ValueError(f"convert_classifier handles the 'finetuned' and 'timm' kinds, got {kind!r}.")
    preset = NamePreset.from_name(name)
    shapes = infer_vit_shapes(state_dict)
    heads = resolve_num_heads(shapes, preset, num_attention_heads, kind)
    size = resolve_image_size(shapes, preset, image_size, kind)
    if "head.weight" not in state_dict:
        raise ValueError(
            f"The {kind} checkpoint has no classification head (head.weight); for a pretraining checkpoint use "
            "--kind beitv2_pretrain or beit_pretrain."
        )
    num_labels = state_dict["head.weight"].shape[0]
    mean_pooling = "fc_norm.weight" in state_dict
    if id2label is not None and len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} labels but the head predicts {num_labels} classes.")
    config = BeitConfig(
        **_backbone_config_kwargs(shapes, preset, heads, size),
        use_mask_token=False,
        use_mean_pooling=mean_pooling,
        num_labels=num_labels,
        **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}),
    )

    accountant = KeyAccountant(state_dict, _DERIVED_KEYS, source=f"{kind} checkpoint")
    out = {"beit.embeddings.cls_token": accountant.take("cls_token")}
    out.update(_convert_backbone(accountant, shapes, zero_k_bias=kind == "timm"))
    final_norm = "beit.pooler.layernorm" if mean_pooling else "beit.layernorm"
    source_norm = "fc_norm" if mean_pooling else "norm"
    for p in ("weight", "bias"):
        out[f"{final_norm}.{p}"] = accountant.take(f"{source_norm}.{p}")
        out[f"classifier.{p}"] = accountant.take(f"head.{p}")
    accountant.finish()

    model = BeitForImageClassification(config)
    load_into(model, out, f"{kind} classifier")
    return model.eval()


def resize_image_processor(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resample: int,
    crop_size: int | None = None,
) -> BeitImageProcessor:
    """Resize to `image_size` x `image_size` (with `crop_size`: the shorter side to `image_size`, then a centre crop
    of `crop_size` x `crop_size`), then `(x - mean) / std` per channel on [0, 1] pixels. `resample` is a PIL filter
    (3: bicubic, 1: Lanczos)."""
    if crop_size is None:
        resize = {"size": {"height": image_size, "width": image_size}, "do_center_crop": False}
    else:
        resize = {
            "size": {"shortest_edge": image_size},
            "do_center_crop": True,
            "crop_size": {"height": crop_size, "width": crop_size},
        }
    return BeitImageProcessor(
        do_resize=True,
        **resize,
        resample=resample,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=False,
    )


def family_normalisation(family: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std: 0.5 / 0.5 for BEiT v1 (`family == "beit"`), the ImageNet statistics otherwise."""
    if family == "beit":
        return tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def classifier_image_processor(config: BeitConfig, family: str | None) -> BeitImageProcessor:
    """The evaluation preprocessing of the reference: bicubic resize to size/0.875 (224 px) then centre crop."""
    size = config.image_size
    resize = int(size / (224 / 256)) if size == 224 else size
    return resize_image_processor(resize, *family_normalisation(family), resample=3, crop_size=size)


# ---------------------------------------------------------------------------------------------------------------
# MIM pretraining checkpoints (BEiT v2 with patch aggregation, BEiT v1 without) -> BeitV2ForMaskedImageModeling
# ---------------------------------------------------------------------------------------------------------------


def convert_mim(
    state_dict: dict[str, torch.Tensor],
    kind: str = "beitv2_pretrain",
    *,
    name: str = "",
    num_attention_heads: int | None = None,
    early_layers: int | None = None,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Build a `BeitV2ForMaskedImageModeling` from a unilm BEiT v2 (`beitv2_pretrain`) or v1 (`beit_pretrain`) model.

    `cls_pt_layers.{j}` become `aggregation_head.layers.{j}`; `cls_pt_norm` / `cls_pt_lm_head` (an unshared
    aggregation head) its own `layernorm` / `lm_head`. `early_layers` is not stored in the checkpoints: it
    defaults to depth - 3 (9 for base, 21 for large), the value of every released model.
    """
    from .configuration_beitv2 import BeitV2Config
    from .modeling_beitv2 import BeitV2ForMaskedImageModeling

    if kind not in ("beitv2_pretrain", "beit_pretrain"):
        raise ValueError(f"convert_mim handles 'beitv2_pretrain' and 'beit_pretrain', got {kind!r}.")
    preset = NamePreset.from_name(name)
    shapes = infer_vit_shapes(state_dict)
    heads = resolve_num_heads(shapes, preset, num_attention_heads, kind)
    size = resolve_image_size(shapes, preset, image_size, kind)
    head_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"^cls_pt_layers\.(\d+)\.", k))}
    if kind == "beit_pretrain" and head_ids:
        raise ValueError(
            "The checkpoint has patch-aggregation layers (cls_pt_layers.*): it is a BEiT v2 pretraining "
            "checkpoint, convert it with --kind beitv2_pretrain."
        )
    if kind == "beitv2_pretrain" and not head_ids:
        raise ValueError(
            "The checkpoint has no patch-aggregation layers (cls_pt_layers.*); for a BEiT v1 pretraining "
            "checkpoint use --kind beit_pretrain."
        )
    if "lm_head.weight" not in state_dict:
        raise ValueError(f"The {kind} checkpoint has no lm_head.weight: it is not a masked-image-modeling model.")
    if head_ids and head_ids != set(range(len(head_ids))):
        raise ValueError(f"cls_pt_layers indices are not contiguous: {sorted(head_ids)}")
    use_aggregation = bool(head_ids)
    if early_layers is None:
        early_layers = shapes.num_hidden_layers - 3
    shared_lm_head = "cls_pt_lm_head.weight" not in state_dict
    config = BeitV2Config(
        **_backbone_config_kwargs(shapes, preset, heads, size),
        vocab_size=state_dict["lm_head.weight"].shape[0],
        use_patch_aggregation=use_aggregation,
        early_layers=early_layers if use_aggregation else BeitV2Config.early_layers,
        head_layers=len(head_ids) if use_aggregation else BeitV2Config.head_layers,
        shared_lm_head=shared_lm_head,
    )

    accountant = KeyAccountant(state_dict, _DERIVED_KEYS, source=f"{kind} checkpoint")
    out = {
        "beit.embeddings.cls_token": accountant.take("cls_token"),
        "beit.embeddings.mask_token": accountant.take("mask_token"),
    }
    out.update(_convert_backbone(accountant, shapes))
    if use_aggregation:
        out.update(
            convert_blocks(
                accountant,
                "cls_pt_layers.",
                "aggregation_head.layers.",
                len(head_ids),
                shapes.layer_scale,
                relative_position_bias=shapes.per_layer_relative_position_bias,
            )
        )
    for p in ("weight", "bias"):
        out[f"layernorm.{p}"] = accountant.take(f"norm.{p}")
        out[f"lm_head.{p}"] = accountant.take(f"lm_head.{p}")
        if use_aggregation and not shared_lm_head:
            out[f"aggregation_head.layernorm.{p}"] = accountant.take(f"cls_pt_norm.{p}")
            out[f"aggregation_head.lm_head.{p}"] = accountant.take(f"cls_pt_lm_head.{p}")
    accountant.finish()

    model = BeitV2ForMaskedImageModeling(config)
    load_into(model, out, f"{kind} model")
    return model.eval()


def mim_image_processor(config: BeitConfig, family: str) -> BeitImageProcessor:
    """Backbone-side inference preprocessing of a MIM model: bicubic resize to `image_size`, family normalisation."""
    return resize_image_processor(config.image_size, *family_normalisation(family), resample=3)


# ---------------------------------------------------------------------------------------------------------------
# VQ-KD tokenizers -> VQKDModel
# ---------------------------------------------------------------------------------------------------------------

# The frozen teacher and its input scaling are not part of the tokenizer. The reference's quantizer also keeps
# `embedding.cluster_size` / `embedding.embed_avg`, which its forward never reads (usage is `quantize.cluster_size`).
_VQKD_DROPPED_KEYS = (
    *_DERIVED_KEYS,
    r"^teacher_model\.",
    r"^scaling_layer\.",
    r"^loss",
    r"^quantize\.embedding\.cluster_size$",
    r"^quantize\.embedding\.embed_avg$",
)
_DECODER_NAME = re.compile(r"decoder_(?P<depth>\d+)x(?P<width>\d+)x(?P<heads>\d+)")


def _convert_vqkd_vit(accountant: KeyAccountant, source: str, target: str, shapes: ViTShapes) -> dict:
    out = {
        f"{target}embeddings.cls_token": accountant.take(f"{source}cls_token"),
        f"{target}embeddings.position_embeddings": accountant.take(f"{source}pos_embed"),
    }
    out.update(convert_patch_embedding(accountant, source, f"{target}embeddings."))
    out.update(convert_blocks(accountant, f"{source}blocks.", f"{target}layers.", shapes.num_hidden_layers, False))
    for p in ("weight", "bias"):
        out[f"{target}layernorm.{p}"] = accountant.take(f"{source}fc_norm.{p}")
    return out


def convert_vqkd(
    state_dict: dict[str, torch.Tensor],
    *,
    name: str = "",
    num_attention_heads: int | None = None,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Build a `VQKDModel` from an official VQ-KD tokenizer checkpoint.

    Encoder/decoder depth, width, patch size, grid, code size, codebook size and teacher dimension are read from
    the weights. Heads are not stored: `num_attention_heads` (encoder and decoder), else the file name
    (`vqkd_encoder_base_decoder_3x768x12_clip` gives 12 decoder heads), else 64-wide heads. The codebook goes to
    `quantizer.codebook`, usage statistics (`quantize.cluster_size`) to `quantizer.cluster_size`.
    """
    from .configuration_vqkd import VQKD_VIT_DEFAULTS, VQKDConfig
    from .modeling_vqkd import VQKDModel

    encoder_match = _VQKD_ENCODER_NAME.search(Path(name).name.lower())
    preset = NamePreset(family="beitv2", size=encoder_match["size"] if encoder_match else None)
    decoder_match = _DECODER_NAME.search(Path(name).name.lower())
    if "quantize.embedding.weight" not in state_dict:
        raise ValueError(
            "No quantize.embedding.weight in the checkpoint: it is not a VQ-KD tokenizer "
            f"(first keys: {sorted(state_dict)[:8]})."
        )
    encoder_shapes = infer_vit_shapes(state_dict, "encoder.")
    decoder_shapes = infer_vit_shapes(state_dict, "decoder.")
    encoder_heads = resolve_num_heads(encoder_shapes, preset, num_attention_heads, "vqkd encoder")
    if num_attention_heads is None and decoder_match:
        num_decoder_heads = int(decoder_match["heads"])
    else:
        num_decoder_heads = resolve_num_heads(decoder_shapes, NamePreset(), num_attention_heads, "vqkd decoder")
    size = resolve_image_size(encoder_shapes, preset, image_size, "vqkd")
    codebook = state_dict["quantize.embedding.weight"]
    grid = size // encoder_shapes.patch_size

    def vit_config(shapes: ViTShapes, heads: int, vit_image_size: int) -> dict:
        # VQ-KD's ViTs have absolute position embeddings, no relative bias and no layer scale: the shapes say so
        # (and the key accounting rejects anything else).
        # The tokenizer's ViT defaults (no drop path, no dropout) first: a converted tokenizer trains like a new one.
        return {**VQKD_VIT_DEFAULTS, **_backbone_config_kwargs(shapes, NamePreset(), heads, vit_image_size)}

    if decoder_shapes.grid_size is not None and decoder_shapes.grid_size != grid:
        raise ValueError(
            f"The VQ-KD decoder's position table is for a {decoder_shapes.grid_size}x{decoder_shapes.grid_size} "
            f"grid but the encoder produces {grid}x{grid} codes."
        )
    config = VQKDConfig(
        encoder_config=vit_config(encoder_shapes, encoder_heads, size),
        decoder_config=vit_config(decoder_shapes, num_decoder_heads, grid),
        num_codes=codebook.shape[0],
        code_dim=codebook.shape[1],
        teacher_dim=state_dict["decode_task_layer.2.weight"].shape[0],
    )

    accountant = KeyAccountant(state_dict, _VQKD_DROPPED_KEYS, source="vqkd checkpoint")
    out = _convert_vqkd_vit(accountant, "encoder.", "encoder.", encoder_shapes)
    out.update(_convert_vqkd_vit(accountant, "decoder.", "decoder.", decoder_shapes))
    for layer in ("encode_task_layer", "decode_task_layer"):
        for index in (0, 2):
            for p in ("weight", "bias"):
                out[f"{layer}.{index}.{p}"] = accountant.take(f"{layer}.{index}.{p}")
    out["quantizer.codebook"] = accountant.take("quantize.embedding.weight")
    out["quantizer.cluster_size"] = accountant.take("quantize.cluster_size")
    # The reference stores `initted` as a float tensor [1.]; an absent flag means the codebook was trained.
    initted = accountant.take_optional("quantize.embedding.initted")
    out["quantizer.initted"] = torch.tensor(bool(initted.item()) if initted is not None else True)
    accountant.finish()

    model = VQKDModel(config)
    load_into(model, out, "vqkd tokenizer")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# DALL-E dVAE -> DVAEModel
# ---------------------------------------------------------------------------------------------------------------


def convert_dalle_dvae(
    encoder_state_dict: dict[str, torch.Tensor],
    decoder_state_dict: dict[str, torch.Tensor],
    *,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Build a `DVAEModel` from the parameters of DALL-E's `encoder.pkl` and `decoder.pkl` (see `load_dalle_pickle`).

    The pickled convolutions name their parameters `w` / `b`; everything else keeps its name under `encoder.` /
    `decoder.`. Width, codebook size, blocks per group and the decoder's input width are read from the shapes;
    the image size is not stored (112 px, BEiT's tokenizer input, unless `image_size` says otherwise).
    """
    from .configuration_dvae import DVAEConfig
    from .modeling_dvae import DVAEModel

    for part, state_dict in (("encoder", encoder_state_dict), ("decoder", decoder_state_dict)):
        if "blocks.input.w" not in state_dict or "blocks.output.conv.w" not in state_dict:
            raise ValueError(
                f"The {part} pickle lacks blocks.input.w / blocks.output.conv.w: it is not a DALL-E {part} "
                f"(first keys: {sorted(state_dict)[:6]})."
            )
    encoder_input = encoder_state_dict["blocks.input.w"]
    decoder_input = decoder_state_dict["blocks.input.w"]
    vocab_size = encoder_state_dict["blocks.output.conv.w"].shape[0]
    if decoder_input.shape[1] != vocab_size:
        raise ValueError(
            f"The decoder reads {decoder_input.shape[1]} codes but the encoder has {vocab_size}: "
            "encoder.pkl and decoder.pkl are not a pair."
        )
    blocks_per_group = len({k.split(".")[2] for k in encoder_state_dict if k.startswith("blocks.group_1.block_")})
    config = DVAEConfig(
        vocab_size=vocab_size,
        hidden_size=encoder_input.shape[0],
        num_blocks_per_group=blocks_per_group,
        num_channels=encoder_input.shape[1],
        decoder_init_channels=decoder_input.shape[0],
        **({"image_size": image_size} if image_size is not None else {}),
    )

    out = {}
    for part, state_dict in (("encoder", encoder_state_dict), ("decoder", decoder_state_dict)):
        accountant = KeyAccountant(state_dict, source=f"DALL-E {part} pickle")
        for key in state_dict:
            stem, parameter = key.rsplit(".", 1)
            if parameter not in ("w", "b"):
                continue  # left for the accountant to report
            out[f"{part}.{stem}.{'weight' if parameter == 'w' else 'bias'}"] = accountant.take(key)
        accountant.finish()
    model = DVAEModel(config)
    load_into(model, out, "DALL-E dVAE")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """A converted model, the image processor that matches it, and what the conversion decided."""

    model: PreTrainedModel
    image_processor: BeitImageProcessor
    kind: str
    notes: dict[str, Any] = field(default_factory=dict)


def _dalle_pickle_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    encoder, decoder = folder / "encoder.pkl", folder / "decoder.pkl"
    if path.is_file() and path.name not in ("encoder.pkl", "decoder.pkl"):
        raise ValueError(f"dalle_dvae expects the folder holding encoder.pkl and decoder.pkl, got the file {path}.")
    missing = [str(p) for p in (encoder, decoder) if not p.is_file()]
    if missing:
        raise ValueError(f"dalle_dvae needs both DALL-E pickles; not found: {missing}")
    return encoder, decoder


def convert_checkpoint(
    kind: str,
    checkpoint: str | os.PathLike,
    *,
    num_attention_heads: int | None = None,
    early_layers: int | None = None,
    image_size: int | None = None,
    id2label: dict[int, str] | None = None,
) -> ConversionResult:
    """Convert one released checkpoint of the given `kind` (one of [`CONVERSION_KINDS`]).

    Args:
        kind: what the checkpoint holds (see the module docstring).
        checkpoint: the file (`.pth`, `.bin`, `.safetensors`); for `dalle_dvae` the folder holding `encoder.pkl`
            and `decoder.pkl`, or the `encoder.pkl` alone.
        num_attention_heads: overrides the head count where the weights do not reveal it.
        early_layers: BEiT v2 pretraining only: which block feeds the patch-aggregation head (not stored in the
            checkpoints; defaults to depth - 3, as in the released models).
        image_size: checked against the stored position tables; sets the size where none is stored.
        id2label: class names of a classifier (`finetuned`, `timm`).
    """
    if kind not in CONVERSION_KINDS:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {list(CONVERSION_KINDS)}.")
    preset = NamePreset.from_name(checkpoint)
    if early_layers is not None and kind != "beitv2_pretrain":
        raise ValueError(f"early_layers only applies to --kind beitv2_pretrain, not {kind!r}.")
    if id2label is not None and kind not in ("finetuned", "timm"):
        raise ValueError(f"id2label only applies to classifiers (finetuned, timm), not {kind!r}.")
    if kind in ("finetuned", "timm"):
        model = convert_classifier(
            load_state_dict(checkpoint),
            kind,
            name=str(checkpoint),
            num_attention_heads=num_attention_heads,
            image_size=image_size,
            id2label=id2label,
        )
        family = preset.family or "beitv2"
        notes = {"family": family, "size": preset.size}
        return ConversionResult(model, classifier_image_processor(model.config, family), kind, notes)
    if kind in ("beitv2_pretrain", "beit_pretrain"):
        model = convert_mim(
            load_state_dict(checkpoint),
            kind,
            name=str(checkpoint),
            num_attention_heads=num_attention_heads,
            early_layers=early_layers,
            image_size=image_size,
        )
        family = "beitv2" if kind == "beitv2_pretrain" else "beit"
        notes = {"family": family, "size": preset.size}
        if kind == "beitv2_pretrain":
            notes["early_layers"] = model.config.early_layers
        return ConversionResult(model, mim_image_processor(model.config, family), kind, notes)
    if kind == "vqkd":
        model = convert_vqkd(
            load_state_dict(checkpoint),
            name=str(checkpoint),
            num_attention_heads=num_attention_heads,
            image_size=image_size,
        )
        teacher = {512: "CLIP ViT-B/16", 768: "DINO ViT-B/16"}.get(model.config.teacher_dim)
        # Plain [0, 1] pixels: the tokenizer maps them to its encoder's [-1, 1] itself.
        processor = resize_image_processor(model.image_size, (0.0,) * 3, (1.0,) * 3, resample=3)
        notes = {"family": "beitv2", "teacher": teacher}
        return ConversionResult(model, processor, kind, notes)
    if num_attention_heads is not None:
        raise ValueError("num_attention_heads does not apply to dalle_dvae (a convolutional network).")
    encoder_path, decoder_path = _dalle_pickle_paths(checkpoint)
    model = convert_dalle_dvae(load_dalle_pickle(encoder_path), load_dalle_pickle(decoder_path), image_size=image_size)
    # Plain [0, 1] pixels: the dVAE applies DALL-E's map_pixels itself. Resampling: PIL Lanczos, as BEiT.
    processor = resize_image_processor(model.image_size, (0.0,) * 3, (1.0,) * 3, resample=1)
    return ConversionResult(model, processor, kind, {"family": "beit"})


def save_conversion(result: ConversionResult, output_dir: str | os.PathLike) -> Path:
    """Write safetensors weights, config and image-processor config to `output_dir`, then reload to verify."""
    output_dir = Path(output_dir)
    result.model.save_pretrained(output_dir)
    result.image_processor.save_pretrained(output_dir)
    reloaded, info = type(result.model).from_pretrained(output_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"The saved model in {output_dir} does not reload cleanly: {problems}")
    return output_dir


__all__: list[str] = [
    "CONVERSION_KINDS",
    "ConversionResult",
    "KeyAccountant",
    "convert_checkpoint",
    "convert_classifier",
    "infer_vit_shapes",
    "load_dalle_pickle",
    "load_state_dict",
    "save_conversion",
]
