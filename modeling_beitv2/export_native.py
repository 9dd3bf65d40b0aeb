"""Export a pretrained BEiT v2 backbone to a stock transformers `beit` model.

`convert_mim_to_native_beit` builds a `BeitModel` / `BeitForImageClassification` / `BeitForSemanticSegmentation`
(`model_type: "beit"`) from a `BeitV2ForMaskedImageModeling` or `BeitV2Model`, so that fine-tuned checkpoints load
with plain transformers and need no custom code. `convert_to_native_feature_extractor` builds the native `BeitModel`
whose outputs equal `BeitV2Model`'s (final LayerNorm kept, `pooler_output` the linear probe's [CLS]), for
`pipeline("image-feature-extraction")` and the Hub's widgets, which run no custom code. The relative position bias is resized with
`attention.resize_relative_position_bias_table` (the reference spline interpolation); absolute position embeddings,
when a model has them, are resized bicubically.

This module is not needed to load a saved BEiT v2 model: `modeling_beitv2.py` does not import it, so
`save_pretrained` copies only what the model itself uses.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from transformers import BeitConfig, BeitModel, PreTrainedModel
from transformers.utils import logging

from .attention import resize_relative_position_bias_table
from .modeling_beitv2 import BeitV2ForMaskedImageModeling, BeitV2Model

logger = logging.get_logger(__name__)

# Config fields that only make sense for pretraining; dropped when exporting to a native `beit` model.
_MIM_ONLY_CONFIG_KEYS = ("use_patch_aggregation", "early_layers", "head_layers", "shared_lm_head")


def convert_mim_to_native_beit(
    model: BeitV2ForMaskedImageModeling | BeitModel,
    model_class: type[PreTrainedModel] = BeitModel,
    image_size: int | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """Export a pretrained BEiT v2 / BEiT backbone as a stock transformers `beit` model for fine-tuning.

    The shared relative position bias is copied into every layer (resized with
    :func:`resize_relative_position_bias_table` when `image_size` differs), the [MASK] embedding, `lm_head` and the
    patch-aggregation head are dropped. The pretraining-time final LayerNorm is dropped too (fine-tuning starts a
    fresh pooling LayerNorm, like the reference's `fc_norm`), unless `use_mean_pooling=False` is among the overrides:
    the native model then ends with that LayerNorm (see `convert_to_native_feature_extractor`). The result loads and saves with plain
    transformers (`model_type: "beit"`), so pipelines and Hub widgets need no custom code.

    Args:
        model: A BEiT v2 MIM model or backbone.
        model_class: The transformers class to build, e.g. `BeitModel`, `BeitForImageClassification` or
            `BeitForSemanticSegmentation`.
        image_size: Fine-tuning resolution (defaults to the pretraining one).
        config_overrides: Extra `BeitConfig` fields (`num_labels`, `id2label`, `drop_path_rate`, `out_indices`...).

    Returns:
        A `model_class` instance whose backbone weights come from `model`; heads keep transformers' init.
    """
    backbone = model.beit if isinstance(model, BeitV2ForMaskedImageModeling) else model
    source_config = backbone.config
    config_dict = source_config.to_dict()
    # Backbone feature selection is recomputed from `out_indices`/`out_features` overrides, if any.
    derived = ("model_type", "architectures", "auto_map", "transformers_version", "out_features", "out_indices")
    # A pretraining config's labels are transformers' two placeholders: the export takes its labels from
    # `config_overrides` only (else `num_labels=1000` would contradict a 2-entry `id2label`).
    labels = ("id2label", "label2id", "num_labels")
    for key in (*_MIM_ONLY_CONFIG_KEYS, *derived, *labels, "stage_names"):
        config_dict.pop(key, None)
    config_dict.update(
        use_mask_token=False,
        use_relative_position_bias=source_config.use_shared_relative_position_bias
        or source_config.use_relative_position_bias,
        use_shared_relative_position_bias=False,
        use_mean_pooling=True,
    )
    if image_size is not None:
        config_dict["image_size"] = image_size
    config_dict.update(config_overrides)
    native = model_class(BeitConfig(**config_dict))

    source_state = backbone.state_dict()
    target_prefix = "beit." if hasattr(native, "beit") else ""
    native_backbone = cast(BeitModel, native.beit if hasattr(native, "beit") else native)
    if isinstance(native_backbone.layernorm, nn.LayerNorm):
        # The final LayerNorm is `model.layernorm` either way: a standalone BeitV2Model's own (then already in
        # `source_state`), or the MIM model's, outside its backbone.
        if not isinstance(model.layernorm, nn.LayerNorm):
            raise ValueError("use_mean_pooling=False keeps the final LayerNorm, but this backbone has none.")
        source_state.update({f"layernorm.{key}": value for key, value in model.layernorm.state_dict().items()})
    else:
        # The pretraining-time final LayerNorm of a standalone BeitV2Model: dropped for fine-tuning.
        source_state = {key: value for key, value in source_state.items() if not key.startswith("layernorm.")}
    source_window = _patch_grid(source_config)
    target_window = _patch_grid(cast(BeitConfig, native.config))  # built from a `BeitConfig` above
    new_state = {}
    for name, tensor in source_state.items():
        if name == "embeddings.mask_token" or name.startswith("pooler."):
            continue
        if name == "shared_position_bias.relative_position_bias_table":
            resized = resize_relative_position_bias_table(tensor, source_window, target_window)
            for index in range(native.config.num_hidden_layers):
                new_state[f"{target_prefix}layers.{index}.relative_position_bias.relative_position_bias_table"] = (
                    resized.clone()
                )
            continue
        if name.endswith(".relative_position_bias.relative_position_bias_table"):
            tensor = resize_relative_position_bias_table(tensor, source_window, target_window)
        if name == "embeddings.position_embeddings" and source_window != target_window:
            tensor = _resize_absolute_position_embeddings(tensor, source_window, target_window)
        new_state[target_prefix + name] = tensor

    missing, unexpected = native.load_state_dict(new_state, strict=False)
    backbone_prefixes = (f"{target_prefix}embeddings.", f"{target_prefix}layers.")
    backbone_missing = [key for key in missing if key.startswith(backbone_prefixes)]
    if unexpected or backbone_missing:
        raise ValueError(
            f"Export to {model_class.__name__} left backbone keys unaccounted for: "
            f"missing={backbone_missing}, unexpected={unexpected}."
        )
    return native


def convert_to_native_feature_extractor(model: BeitV2ForMaskedImageModeling | BeitV2Model) -> BeitModel:
    """A stock transformers `BeitModel` (`model_type: "beit"`) that gives the same features as [`BeitV2Model`].

    Native `BeitModel` with `use_mean_pooling=False` ends with a LayerNorm (here the pretraining model's final one)
    and its `BeitPooler` then returns the [CLS] token of the normalised tokens: exactly `BeitV2Model`'s
    `last_hidden_state` and, for a model pretrained with patch aggregation, its `pooler_output` (the linear probe's
    representation). `pipeline("image-feature-extraction")` and the Hub's widget then give probe features (`pool=True`)
    or the tokens, with no custom code.

    Without patch aggregation the probe's representation is the mean of the normalised patch tokens, which no
    native `BeitPooler` computes (its mean-pooling variant normalises after averaging, with a LayerNorm of its own):
    `last_hidden_state` still matches, `pooler_output` is [CLS], and a warning says so; average
    `last_hidden_state[:, 1:]` instead.

    Args:
        model: A BEiT v2 MIM model or a standalone `BeitV2Model` (with its final LayerNorm).

    Returns:
        A `BeitModel` in eval mode, at the pretraining resolution, with a pooling layer and no [MASK] embedding.
    """
    config = model.config
    if not config.use_patch_aggregation:
        logger.warning(
            "This model was pretrained without patch aggregation: its linear-probe representation is the mean of the "
            "normalised patch tokens, which native BeitModel's pooler cannot compute. The native `pooler_output` is "
            "the [CLS] token; use `last_hidden_state[:, 1:].mean(1)` for probe features."
        )
    return convert_mim_to_native_beit(model, BeitModel, use_mean_pooling=False).eval()


def _resize_absolute_position_embeddings(
    position_embeddings: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of `(1, 1 + h*w, dim)` absolute position embeddings, keeping the [CLS] row."""
    cls_row, grid = position_embeddings[:, :1], position_embeddings[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *source_window, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid.float(), size=target_window, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, math.prod(target_window), dim).to(position_embeddings.dtype)
    return torch.cat([cls_row, grid], dim=1)


def _patch_grid(config: BeitConfig) -> tuple[int, int]:
    image_size, patch_size = config.image_size, config.patch_size
    image_h, image_w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    patch_h, patch_w = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    return image_h // patch_h, image_w // patch_w


__all__ = ["convert_mim_to_native_beit", "convert_to_native_feature_extractor"]
