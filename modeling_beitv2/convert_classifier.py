"""unilm fine-tuned (`finetuned`) and timm (`timm`) BEiT / BEiT v2 classifiers -> native `BeitForImageClassification`."""

from __future__ import annotations

from typing import Any

import torch
from transformers import BeitConfig, BeitForImageClassification

from .key_accounting import DERIVED_KEYS, KeyAccountant, load_into
from .vit_key_mapping import convert_backbone
from .vit_shapes import NamePreset, backbone_config_kwargs, infer_vit_shapes, resolve_image_size, resolve_num_heads

CLASSIFIER_KINDS = ("finetuned", "timm")


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
    shared and absolute position tables are all carried over as stored. timm's all-zero `attn.k_bias` buffers are
    checked and dropped.

    Args:
        state_dict: the checkpoint's weights (see `load_state_dict`).
        kind: `"finetuned"` or `"timm"`.
        name: the checkpoint's file name; a released name (`beitv2_base_patch16_224_...`) gives the size preset.
        num_attention_heads: overrides the head count where the weights do not reveal it.
        image_size: checked against the stored position tables; sets the size where none is stored.
        id2label: class names, one per row of the head.
    """
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"convert_classifier handles the {list(CLASSIFIER_KINDS)} kinds, got {kind!r}.")
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
    labels: dict[str, Any] = (
        {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    )
    config = BeitConfig(
        **backbone_config_kwargs(shapes, preset, heads, size),
        use_mask_token=False,
        use_mean_pooling=mean_pooling,
        num_labels=num_labels,  # type: ignore[call-arg]  # a `PreTrainedConfig` keyword the dataclass stub omits
        **labels,
    )

    accountant = KeyAccountant(state_dict, DERIVED_KEYS, source=f"{kind} checkpoint")
    out = {"beit.embeddings.cls_token": accountant.take("cls_token")}
    out.update(convert_backbone(accountant, shapes, zero_k_bias=kind == "timm"))
    final_norm = "beit.pooler.layernorm" if mean_pooling else "beit.layernorm"
    source_norm = "fc_norm" if mean_pooling else "norm"
    for p in ("weight", "bias"):
        out[f"{final_norm}.{p}"] = accountant.take(f"{source_norm}.{p}")
        out[f"classifier.{p}"] = accountant.take(f"head.{p}")
    accountant.finish()

    model = BeitForImageClassification(config)
    load_into(model, out, f"{kind} classifier")
    return model.eval()
