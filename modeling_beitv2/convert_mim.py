"""unilm masked-image-modeling checkpoints -> `BeitV2ForMaskedImageModeling`.

BEiT v2 pretraining checkpoints (`beitv2_pretrain`) carry the patch-aggregation layers (`cls_pt_layers.*`); BEiT v1
ones (`beit_pretrain`) do not and become a model with `use_patch_aggregation=False`.
"""

from __future__ import annotations

import re

import torch

from .configuration_beitv2 import BeitV2Config
from .key_accounting import DERIVED_KEYS, KeyAccountant, load_into
from .modeling_beitv2 import BeitV2ForMaskedImageModeling
from .vit_key_mapping import convert_backbone, convert_blocks
from .vit_shapes import NamePreset, backbone_config_kwargs, infer_vit_shapes, resolve_image_size, resolve_num_heads

MIM_KINDS = ("beitv2_pretrain", "beit_pretrain")
_AGGREGATION_LAYER = re.compile(r"^cls_pt_layers\.(\d+)\.")


def convert_mim(
    state_dict: dict[str, torch.Tensor],
    kind: str = "beitv2_pretrain",
    *,
    name: str = "",
    num_attention_heads: int | None = None,
    early_layers: int | None = None,
    image_size: int | None = None,
) -> BeitV2ForMaskedImageModeling:
    """Build a `BeitV2ForMaskedImageModeling` from a unilm BEiT v2 (`beitv2_pretrain`) or v1 (`beit_pretrain`) model.

    `cls_pt_layers.{j}` become `aggregation_head.layers.{j}`; `cls_pt_norm` / `cls_pt_lm_head` (an unshared
    aggregation head) its own `layernorm` / `lm_head`. `early_layers` is not stored in the checkpoints: it
    defaults to depth - 3 (9 for base, 21 for large), the value of every released model.

    Args:
        state_dict: the checkpoint's weights (see `load_state_dict`).
        kind: `"beitv2_pretrain"` or `"beit_pretrain"`; checked against the presence of aggregation layers.
        name: the checkpoint's file name; a released name (`beitv2_base_patch16_224_...`) gives the size preset.
        num_attention_heads: overrides the head count where the weights do not reveal it.
        early_layers: `beitv2_pretrain` only: which block feeds the aggregation head.
        image_size: checked against the stored position tables; sets the size where none is stored.
    """
    if kind not in MIM_KINDS:
        raise ValueError(f"convert_mim handles {list(MIM_KINDS)}, got {kind!r}.")
    preset = NamePreset.from_name(name)
    shapes = infer_vit_shapes(state_dict)
    heads = resolve_num_heads(shapes, preset, num_attention_heads, kind)
    size = resolve_image_size(shapes, preset, image_size, kind)
    head_ids = {int(m.group(1)) for k in state_dict if (m := _AGGREGATION_LAYER.match(k))}
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
        **backbone_config_kwargs(shapes, preset, heads, size),
        vocab_size=state_dict["lm_head.weight"].shape[0],
        use_patch_aggregation=use_aggregation,
        early_layers=early_layers if use_aggregation else BeitV2Config.early_layers,
        head_layers=len(head_ids) if use_aggregation else BeitV2Config.head_layers,
        shared_lm_head=shared_lm_head,
    )

    accountant = KeyAccountant(state_dict, DERIVED_KEYS, source=f"{kind} checkpoint")
    out = {
        "beit.embeddings.cls_token": accountant.take("cls_token"),
        "beit.embeddings.mask_token": accountant.take("mask_token"),
    }
    out.update(convert_backbone(accountant, shapes))
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
