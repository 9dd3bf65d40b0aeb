"""Optimizer parameter groups shared by every training script: weight-decay exclusions and layer-wise lr decay.

Works on module names of transformers' BEiT layout (``embeddings.*``, ``layers.{i}.*``, optionally prefixed,
e.g. ``beit.layers.3.mlp.fc1.weight``) and therefore on our MIM model, the VQ-KD encoder and the native
``BeitForImageClassification`` / ``UperNetForSemanticSegmentation`` (``backbone.beit.*``) alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

_LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING_PATTERN = re.compile(r"(?:^|\.)embeddings\.")


def layer_id_for_parameter(name: str, num_layers: int) -> int:
    """BEiT's layer numbering for layer decay: 0 for the embeddings, ``i + 1`` for block ``i``, ``L + 1`` otherwise.

    "Otherwise" covers the heads and the shared relative position bias (the reference also puts its shared
    bias at the top, so it keeps the full learning rate).
    """
    if _EMBEDDING_PATTERN.search(name):
        return 0
    match = _LAYER_PATTERN.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    no_weight_decay_names: Iterable[str] = ("cls_token", "position_embeddings"),
    layer_decay: float | None = None,
    num_layers: int | None = None,
) -> list[dict]:
    """Split trainable parameters into groups for AdamW.

    No weight decay goes to 1-D parameters (norms, layer scales), biases, and any parameter whose name ends
    with one of ``no_weight_decay_names``. With ``layer_decay``, each group also gets ``lr_scale =
    layer_decay ** (num_layers + 1 - layer_id)``; :func:`apply_lr_scale` turns it into the group's ``lr``.

    Returns:
        A list of dicts with ``params``, ``weight_decay``, ``lr_scale`` and ``names`` (for logging and tests).
    """
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers (the number of Transformer blocks).")
    no_decay_suffixes = tuple(no_weight_decay_names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip_decay = param.ndim <= 1 or name.endswith(".bias") or name.endswith(no_decay_suffixes)
        layer_id = layer_id_for_parameter(name, num_layers) if layer_decay is not None else 0
        key = (layer_id, skip_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if skip_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def apply_lr_scale(param_groups: list[dict], learning_rate: float) -> list[dict]:
    """Set each group's initial ``lr`` to ``learning_rate * lr_scale`` (schedulers then scale it over time)."""
    for group in param_groups:
        group["lr"] = learning_rate * group.get("lr_scale", 1.0)
    return param_groups
