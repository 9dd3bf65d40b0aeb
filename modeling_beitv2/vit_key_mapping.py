"""Key mapping of unilm / timm ViT weights onto transformers' BEiT layers, shared by every ViT converter.

| unilm / timm | transformers BEiT |
|---|---|
| `blocks.{i}.norm1` / `norm2` | `layers.{i}.layernorm_before` / `layernorm_after` |
| `blocks.{i}.attn.qkv.weight` (fused) | `layers.{i}.attention.{q,k,v}_proj.weight` |
| `blocks.{i}.attn.q_bias` / `v_bias` | `layers.{i}.attention.q_proj.bias` / `v_proj.bias` (k has no bias) |
| `blocks.{i}.attn.proj` | `layers.{i}.attention.o_proj` |
| `blocks.{i}.gamma_1` / `gamma_2` | `layers.{i}.lambda_1` / `lambda_2` |
| `patch_embed.proj` | `embeddings.patch_embeddings.projection` |
| `rel_pos_bias.relative_position_bias_table` | `shared_position_bias.relative_position_bias_table` |
"""

from __future__ import annotations

import torch

from .key_accounting import KeyAccountant
from .vit_shapes import ViTShapes


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

    The fused `attn.qkv.weight` `(3 * hidden, hidden)` is split into q/k/v; the key projection has no bias (`q_bias`
    and `v_bias` are separate parameters in the source). `zero_k_bias` accepts timm's all-zero `attn.k_bias` buffer.
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


def convert_patch_embedding(
    accountant: KeyAccountant, source_prefix: str, target_prefix: str
) -> dict[str, torch.Tensor]:
    """`{source_prefix}patch_embed.proj.*` -> `{target_prefix}patch_embeddings.projection.*`."""
    return {
        f"{target_prefix}patch_embeddings.projection.{p}": accountant.take(f"{source_prefix}patch_embed.proj.{p}")
        for p in ("weight", "bias")
    }


def convert_backbone(accountant: KeyAccountant, shapes: ViTShapes, zero_k_bias: bool = False) -> dict:
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
