"""Loading a frozen visual tokenizer (VQ-KD for BEiT v2, the DALL-E dVAE for BEiT v1).

Both share one interface, so scripts treat them alike: `codebook_size`, `image_size` (side of the images read),
`patch_grid` (rows, columns of codes) and `get_codebook_indices(pixel_values)` on plain [0, 1] pixels; each applies
its own input mapping.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel

from modeling_beitv2 import DVAEModel, VQKDModel

VisualTokenizer = VQKDModel | DVAEModel


def load_visual_tokenizer(
    name_or_path: str,
    expected: tuple[type, ...] = (VQKDModel, DVAEModel),
    hint: str = "",
    **hub_kwargs: Any,
) -> VisualTokenizer:
    """The tokenizer at `name_or_path` in eval mode without gradients; a model of another class raises, with `hint`.

    `hub_kwargs` (`revision`, `token`, `trust_remote_code`) go to `AutoModel.from_pretrained`.
    """
    tokenizer = AutoModel.from_pretrained(name_or_path, **hub_kwargs)
    if not isinstance(tokenizer, expected):
        names = " or ".join(kind.__name__ for kind in expected)
        raise ValueError(
            f"{name_or_path!r} is a {type(tokenizer).__name__}; expected a {names}{f' ({hint})' if hint else ''}."
        )
    return tokenizer.eval().requires_grad_(False)
