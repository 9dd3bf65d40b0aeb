"""BEiT's layer-wise learning-rate decay for fine-tuning (as in BEiT's and MAE's `lr_decay.py`): the parameter
groups of `pretraining.loop.build_param_groups`, split by layer, each with its own initial learning rate."""

from __future__ import annotations

import re
from typing import Any

import torch

from pretraining.loop import build_param_groups

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
    return int(match.group(1)) + 1 if match else num_layers + 1


def layer_decay_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    learning_rate: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """The weight-decay groups of :func:`~pretraining.loop.build_param_groups`, split by layer when `layer_decay` is
    given; each group gets ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` (1 without layer decay) and its
    initial ``lr = learning_rate * lr_scale`` (schedulers then scale it over time).
    """
    if layer_decay is None:
        groups = build_param_groups(model, weight_decay)
        return [{**group, "lr_scale": 1.0, "lr": learning_rate} for group in groups]
    if num_layers is None:
        raise ValueError("layer_decay needs num_layers (the number of Transformer blocks).")
    groups = build_param_groups(model, weight_decay, layer_id=lambda name: layer_id_for_parameter(name, num_layers))
    for group in groups:
        scale = layer_decay ** (num_layers + 1 - layer_id_for_parameter(group["names"][0], num_layers))
        group.update(lr_scale=scale, lr=learning_rate * scale)
    return groups
