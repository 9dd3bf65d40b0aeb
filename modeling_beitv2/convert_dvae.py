"""The DALL-E discrete VAE (`encoder.pkl` / `decoder.pkl`, BEiT v1's tokenizer) -> `DVAEModel`."""

from __future__ import annotations

from typing import Any

import torch

from .configuration_dvae import DVAEConfig
from .key_accounting import KeyAccountant, load_into
from .modeling_dvae import DVAEModel


def convert_dalle_dvae(
    encoder_state_dict: dict[str, torch.Tensor],
    decoder_state_dict: dict[str, torch.Tensor],
    *,
    image_size: int | None = None,
) -> DVAEModel:
    """Build a `DVAEModel` from the parameters of DALL-E's `encoder.pkl` and `decoder.pkl` (see `load_dalle_pickle`).

    The pickled convolutions name their parameters `w` / `b`; everything else keeps its name under `encoder.` /
    `decoder.`. Width, codebook size, blocks per group and the decoder's input width are read from the shapes;
    the image size is not stored (112 px, BEiT's tokenizer input, unless `image_size` says otherwise).
    """
    for part, state_dict in (("encoder", encoder_state_dict), ("decoder", decoder_state_dict)):
        if "blocks.input.w" not in state_dict or "blocks.output.conv.w" not in state_dict:
            raise ValueError(
                f"The {part} pickle lacks blocks.input.w / blocks.output.conv.w: it is not a DALL-E {part} "
                f"(first keys: {sorted(state_dict)[:6]})."
            )
    encoder_input = encoder_state_dict["blocks.input.w"]
    decoder_input = decoder_state_dict["blocks.input.w"]
    codebook_size = encoder_state_dict["blocks.output.conv.w"].shape[0]
    if decoder_input.shape[1] != codebook_size:
        raise ValueError(
            f"The decoder reads {decoder_input.shape[1]} codes but the encoder has {codebook_size}: "
            "encoder.pkl and decoder.pkl are not a pair."
        )
    blocks_per_group = len({k.split(".")[2] for k in encoder_state_dict if k.startswith("blocks.group_1.block_")})
    size: dict[str, Any] = {"image_size": image_size} if image_size is not None else {}
    config = DVAEConfig(
        codebook_size=codebook_size,
        hidden_size=encoder_input.shape[0],
        num_blocks_per_group=blocks_per_group,
        num_channels=encoder_input.shape[1],
        decoder_init_channels=decoder_input.shape[0],
        **size,
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
