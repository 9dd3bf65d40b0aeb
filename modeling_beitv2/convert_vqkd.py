"""unilm VQ-KD tokenizer checkpoints (CLIP or DINO teacher, 1- or 3-layer decoder) -> `VQKDModel`."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .configuration_vqkd import VQKD_VIT_DEFAULTS, VQKD_VIT_SIZES, VQKDConfig
from .key_accounting import DERIVED_KEYS, KeyAccountant, load_into
from .modeling_vqkd import VQKDModel
from .vit_key_mapping import convert_blocks, convert_patch_embedding
from .vit_shapes import (
    NamePreset,
    ViTShapes,
    backbone_config_kwargs,
    infer_vit_shapes,
    resolve_image_size,
    resolve_num_heads,
)

# The frozen teacher and its input scaling are not part of the tokenizer. The reference's quantizer also keeps
# `embedding.cluster_size` / `embedding.embed_avg`, which its forward never reads (usage is `quantize.cluster_size`).
_VQKD_DROPPED_KEYS = (
    *DERIVED_KEYS,
    r"^teacher_model\.",
    r"^scaling_layer\.",
    r"^loss",
    r"^quantize\.embedding\.cluster_size$",
    r"^quantize\.embedding\.embed_avg$",
)
# Released file names: `vqkd_encoder_base_decoder_3x768x12_clip.pth` (encoder size, decoder depth x width x heads).
_ENCODER_NAME = re.compile(rf"encoder_(?P<size>{'|'.join(VQKD_VIT_SIZES)})")
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


def _vit_config(shapes: ViTShapes, num_heads: int, image_size: int) -> dict:
    # VQ-KD's ViTs have absolute position embeddings, no relative bias and no layer scale: the shapes say so (and the
    # key accounting rejects anything else). The tokenizer's ViT defaults (no drop path, no dropout) come first: a
    # converted tokenizer trains like a new one.
    return {**VQKD_VIT_DEFAULTS, **backbone_config_kwargs(shapes, NamePreset(), num_heads, image_size)}


def convert_vqkd(
    state_dict: dict[str, torch.Tensor],
    *,
    name: str = "",
    num_attention_heads: int | None = None,
    image_size: int | None = None,
) -> VQKDModel:
    """Build a `VQKDModel` from an official VQ-KD tokenizer checkpoint.

    Encoder/decoder depth, width, patch size, grid, code size, codebook size and teacher dimension are read from
    the weights. Heads are not stored: `num_attention_heads` (encoder and decoder), else the file name
    (`vqkd_encoder_base_decoder_3x768x12_clip` gives 12 decoder heads and the base encoder's 12), else 64-wide
    heads. The codebook goes to `quantizer.codebook`, usage statistics (`quantize.cluster_size`) to
    `quantizer.cluster_size`.
    """
    file_name = Path(name).name.lower()
    encoder_match = _ENCODER_NAME.search(file_name)
    encoder_preset = NamePreset(family="beitv2", size=encoder_match["size"] if encoder_match else None)
    decoder_match = _DECODER_NAME.search(file_name)
    if "quantize.embedding.weight" not in state_dict:
        raise ValueError(
            "No quantize.embedding.weight in the checkpoint: it is not a VQ-KD tokenizer "
            f"(first keys: {sorted(state_dict)[:8]})."
        )
    encoder_shapes = infer_vit_shapes(state_dict, "encoder.")
    decoder_shapes = infer_vit_shapes(state_dict, "decoder.")
    encoder_heads = resolve_num_heads(
        encoder_shapes, encoder_preset, num_attention_heads, "vqkd encoder", sizes=VQKD_VIT_SIZES
    )
    if num_attention_heads is None and decoder_match:
        decoder_heads = int(decoder_match["heads"])
    else:
        decoder_heads = resolve_num_heads(decoder_shapes, NamePreset(), num_attention_heads, "vqkd decoder")
    size = resolve_image_size(encoder_shapes, encoder_preset, image_size, "vqkd")
    codebook = state_dict["quantize.embedding.weight"]
    grid = size // encoder_shapes.patch_size
    if decoder_shapes.grid_size is not None and decoder_shapes.grid_size != grid:
        raise ValueError(
            f"The VQ-KD decoder's position table is for a {decoder_shapes.grid_size}x{decoder_shapes.grid_size} "
            f"grid but the encoder produces {grid}x{grid} codes."
        )
    config = VQKDConfig(
        encoder_config=_vit_config(encoder_shapes, encoder_heads, size),
        decoder_config=_vit_config(decoder_shapes, decoder_heads, grid),
        codebook_size=codebook.shape[0],
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
