"""Weight initialisation shared by every model of this package (and the tokenizers' check of their input pixels).

The official BEiT / BEiT v2 code initialises its ViTs differently from transformers' ``BeitModel``:
truncated normal cut at +-1 std (not +-2), and the residual-branch output weights of block ``i``
divided by ``sqrt(2 i)``. Everything here goes through ``transformers.initialization`` so that weights
loaded by ``from_pretrained`` (flagged ``_is_hf_initialized``) are never touched.

Why the work happens on leaf modules: transformers treats our classes as custom code and skips the
``_init_weights`` call of any module without parameters of its own (a ``BeitModel``, a ``ModuleList``,
a ``BeitLayer`` without layer scale). So a model *marks* its residual-branch Linears at construction time
(:func:`mark_residual_branches`) and :func:`init_vit_module_` applies the rescale when it reaches them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.beit.modeling_beit import BeitLayer

_LAYER_NUMBER_ATTR = "_residual_layer_number"
_TORCH_DEFAULT_ATTR = "_keeps_torch_default_init"

NON_FINITE_PIXELS_MESSAGE = (
    "get_codebook_indices: pixel_values contain NaN or infinity (every code would silently be 0); check the images "
    "and the image processor."
)


def check_finite_pixels(pixel_values: torch.Tensor) -> None:
    """Fail on NaN or infinity in a tokenizer's `pixel_values`, whose codes would otherwise silently be 0.

    Checked on the device without waiting for it: a `RuntimeError` at once on CPU, at the next synchronisation on
    GPU.
    """
    torch._assert_async(torch.isfinite(pixel_values).all(), NON_FINITE_PIXELS_MESSAGE)


def trunc_normal_one_std_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated normal with mean 0 and ``std``, cut at +-1 std as the reference does."""
    return init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def mark_residual_branches(
    layers: Iterable[nn.Module], first_layer_number: int = 1, keep_torch_default_init: bool = False
) -> None:
    """Mark each ``BeitLayer``'s attention output and second MLP Linear for the ``sqrt(2 * layer_number)`` rescale.

    ``layer_number`` starts at ``first_layer_number`` for the first layer given (1 for the main trunk,
    ``early_layers + 1`` for BEiT v2's patch-aggregation head). With ``keep_torch_default_init`` every Linear of
    these layers keeps PyTorch's own init instead of the truncated normal (the reference builds its
    aggregation head after its init pass).
    """
    for offset, block in enumerate(layers):
        layer = cast(BeitLayer, block)
        for linear in (layer.attention.o_proj, layer.mlp.fc2):
            setattr(linear, _LAYER_NUMBER_ATTR, first_layer_number + offset)
        if keep_torch_default_init:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    setattr(module, _TORCH_DEFAULT_ATTR, True)
            # The reference's q and v biases are separate parameters created as zeros, not Linear biases.
            for linear in (layer.attention.q_proj, layer.attention.v_proj):
                setattr(linear, _TORCH_DEFAULT_ATTR, "weight_only")


def init_vit_module_(module: nn.Module, std: float, truncation: float | None = None) -> None:
    """Reference init for one leaf module: Linear/Conv truncated normal, bias 0, LayerNorm (1, 0), then the
    residual rescale for Linears marked by :func:`mark_residual_branches`.

    ``truncation`` is the absolute cut-off of the normal: ``None`` cuts at +-1 std (BEiT / BEiT v2 pretraining);
    the VQ-KD tokenizer uses timm's default of +-2, which at std 0.02 is a plain normal in practice.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        torch_default = getattr(module, _TORCH_DEFAULT_ATTR, False)
        if torch_default:
            module.reset_parameters()  # torch.nn.init is guarded by transformers while this runs
            if torch_default == "weight_only" and module.bias is not None:
                init.zeros_(module.bias)
        else:
            if truncation is None:
                trunc_normal_one_std_(module.weight, std)
            else:
                init.trunc_normal_(module.weight, mean=0.0, std=std, a=-truncation, b=truncation)
            if module.bias is not None:
                init.zeros_(module.bias)
        layer_number = getattr(module, _LAYER_NUMBER_ATTR, None)
        if layer_number is not None:
            init.copy_(module.weight, module.weight / math.sqrt(2.0 * layer_number))
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
