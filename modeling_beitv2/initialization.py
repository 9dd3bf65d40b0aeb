"""Weight initialisation shared by every model of this package.

The official BEiT / BEiT v2 code initialises its ViTs differently from transformers' ``BeitModel``:
truncated normal cut at +-1 std (not +-2), and the residual-branch output weights of block ``i``
divided by ``sqrt(2 i)``. These helpers go through ``transformers.initialization`` so that weights
loaded by ``from_pretrained`` (flagged ``_is_hf_initialized``) are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import initialization as init


def trunc_normal_one_std_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated normal with mean 0 and ``std``, cut at +-1 std as the reference does."""
    return init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def init_vit_module_(module: nn.Module, std: float) -> None:
    """Reference init for one leaf module: Linear/Conv truncated normal, bias 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_one_std_(module.weight, std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


def rescale_residual_branches_(layers: Iterable[nn.Module], first_layer_number: int = 1) -> None:
    """Divide each ``BeitLayer``'s attention output and second MLP weight by ``sqrt(2 * layer_number)``.

    ``layer_number`` starts at ``first_layer_number`` for the first layer given (1 for the main trunk,
    ``early_layers + 1`` for the patch-aggregation head, as in the reference).
    """
    for offset, layer in enumerate(layers):
        scale = math.sqrt(2.0 * (first_layer_number + offset))
        for weight in (layer.attention.o_proj.weight, layer.mlp.fc2.weight):
            init.copy_(weight, weight / scale)
