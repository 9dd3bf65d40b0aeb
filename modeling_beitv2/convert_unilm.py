"""Convert the released BEiT / BEiT v2 checkpoints (microsoft/unilm, timm, DALL-E) to this library's models.

Six kinds of checkpoint are understood (see [`CONVERSION_KINDS`]), each by its own module:

| kind | source | target | module |
|---|---|---|---|
| `vqkd` | unilm VQ-KD tokenizers (CLIP or DINO teacher, 1- or 3-layer decoder) | `VQKDModel` | `convert_vqkd` |
| `beitv2_pretrain` | unilm BEiT v2 MIM checkpoints (with the patch-aggregation layers) | `BeitV2ForMaskedImageModeling` | `convert_mim` |
| `beit_pretrain` | unilm BEiT v1 MIM checkpoints | `BeitV2ForMaskedImageModeling` without aggregation | `convert_mim` |
| `finetuned` | unilm fine-tuned classifiers (BEiT and BEiT v2) | native `BeitForImageClassification` | `convert_classifier` |
| `timm` | timm `beitv2_*` / `beit_*` state dicts | native `BeitForImageClassification` | `convert_classifier` |
| `dalle_dvae` | the DALL-E `encoder.pkl` / `decoder.pkl` pickles | `DVAEModel` | `convert_dvae` |

Checkpoints are read safely by `checkpoint_reading`. Every conversion accounts for every key (`key_accounting`): a
source key that no rule consumes, or a key a rule needs and the checkpoint lacks, raises a `ValueError` that lists
them. Keys that only hold derived values (relative position indices, the frozen teacher of a VQ-KD checkpoint, ...)
are dropped by name, never silently.

The architecture is read from tensor shapes (`vit_shapes`: depth, width, MLP width, patch size, grid, codebook
size, decoder depth, number of heads where a relative position bias table reveals it). What the weights do not
store comes from the checkpoint's file name when it follows the released naming (`beitv2_base_patch16_224_...`),
looked up in the preset tables, or from explicit arguments (`num_attention_heads`, `early_layers`, `image_size`).

This package builds no image processor: a [`ConversionResult`] says how the reference evaluates images
([`EvaluationPreprocessing`]) and `examples/convert_unilm_checkpoint.py` turns that into one with
`processing.evaluation`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from transformers import PreTrainedModel

from .checkpoint_reading import dalle_pickle_paths, load_dalle_pickle, load_state_dict
from .convert_classifier import CLASSIFIER_KINDS, convert_classifier
from .convert_dvae import convert_dalle_dvae
from .convert_mim import MIM_KINDS, convert_mim
from .convert_vqkd import convert_vqkd
from .vit_shapes import NamePreset

CONVERSION_KINDS = ("vqkd", *MIM_KINDS, *CLASSIFIER_KINDS, "dalle_dvae")

# The reference evaluates classifiers at 224 px by resizing the shorter side to 256 and cropping the centre (crop
# fraction 224 / 256); at any other resolution it resizes to the resolution itself and crops the centre square.
_REFERENCE_CROP_PCT_AT_224 = 0.875
_TEACHERS_BY_FEATURE_SIZE = {512: "CLIP ViT-B/16", 768: "DINO ViT-B/16"}


@dataclass(frozen=True)
class EvaluationPreprocessing:
    """How the reference prepares images for a converted model at inference.

    Attributes:
        image_size: side of the square the model sees.
        normalisation: `"beitv2"` or `"beit"`: that family's pixel mean and std; `None`: plain [0, 1] pixels (the
            tokenizers map them to their own range themselves).
        crop_pct: the shorter side is resized to `image_size / crop_pct`, then the centre `image_size` square is
            cropped; `None`: the whole image is resized to `image_size` x `image_size`.
        resample: `"bicubic"` or `"lanczos"` (the DALL-E dVAE's, as in BEiT).
    """

    image_size: int
    normalisation: str | None
    crop_pct: float | None
    resample: str = "bicubic"


@dataclass
class ConversionResult:
    """A converted model, how its reference evaluates images, and what the conversion decided (`notes`)."""

    model: PreTrainedModel
    preprocessing: EvaluationPreprocessing
    kind: str
    notes: dict[str, Any] = field(default_factory=dict)


def convert_checkpoint(
    kind: str,
    checkpoint: str | os.PathLike,
    *,
    num_attention_heads: int | None = None,
    early_layers: int | None = None,
    image_size: int | None = None,
    id2label: dict[int, str] | None = None,
) -> ConversionResult:
    """Convert one released checkpoint of the given `kind` (one of [`CONVERSION_KINDS`]).

    Args:
        kind: what the checkpoint holds (see the module docstring).
        checkpoint: the file (`.pth`, `.bin`, `.safetensors`); for `dalle_dvae` the folder holding `encoder.pkl`
            and `decoder.pkl`, or the `encoder.pkl` alone.
        num_attention_heads: overrides the head count where the weights do not reveal it.
        early_layers: BEiT v2 pretraining only: which block feeds the patch-aggregation head (not stored in the
            checkpoints; defaults to depth - 3, as in the released models).
        image_size: checked against the stored position tables; sets the size where none is stored.
        id2label: class names of a classifier (`finetuned`, `timm`).
    """
    if kind not in CONVERSION_KINDS:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {list(CONVERSION_KINDS)}.")
    preset = NamePreset.from_name(checkpoint)
    if early_layers is not None and kind != "beitv2_pretrain":
        raise ValueError(f"early_layers only applies to --kind beitv2_pretrain, not {kind!r}.")
    if id2label is not None and kind not in CLASSIFIER_KINDS:
        raise ValueError(f"id2label only applies to classifiers {list(CLASSIFIER_KINDS)}, not {kind!r}.")
    if kind == "dalle_dvae" and num_attention_heads is not None:
        raise ValueError("num_attention_heads does not apply to dalle_dvae (a convolutional network).")
    shared: dict[str, Any] = {
        "name": str(checkpoint),
        "num_attention_heads": num_attention_heads,
        "image_size": image_size,
    }

    model: PreTrainedModel
    if kind in CLASSIFIER_KINDS:
        model = convert_classifier(load_state_dict(checkpoint), kind, **shared, id2label=id2label)
        family = preset.family or "beitv2"
        size = cast(int, model.config.image_size)  # converted configs hold one int side
        crop_pct = _REFERENCE_CROP_PCT_AT_224 if size == 224 else 1.0
        preprocessing = EvaluationPreprocessing(size, family, crop_pct)
        notes: dict[str, Any] = {"family": family, "size": preset.size}
    elif kind in MIM_KINDS:
        model = convert_mim(load_state_dict(checkpoint), kind, **shared, early_layers=early_layers)
        family = "beitv2" if kind == "beitv2_pretrain" else "beit"
        preprocessing = EvaluationPreprocessing(cast(int, model.config.image_size), family, crop_pct=None)
        notes = {"family": family, "size": preset.size}
        if kind == "beitv2_pretrain":
            notes["early_layers"] = model.config.early_layers
    elif kind == "vqkd":
        model = convert_vqkd(load_state_dict(checkpoint), **shared)
        preprocessing = EvaluationPreprocessing(model.image_size, normalisation=None, crop_pct=None)
        notes = {"family": "beitv2", "teacher": _TEACHERS_BY_FEATURE_SIZE.get(model.config.teacher_dim)}
    else:
        encoder_path, decoder_path = dalle_pickle_paths(checkpoint)
        model = convert_dalle_dvae(
            load_dalle_pickle(encoder_path), load_dalle_pickle(decoder_path), image_size=image_size
        )
        # The dVAE applies DALL-E's map_pixels itself; BEiT resizes its input with PIL's Lanczos filter.
        preprocessing = EvaluationPreprocessing(model.image_size, None, crop_pct=None, resample="lanczos")
        notes = {"family": "beit"}
    return ConversionResult(model, preprocessing, kind, notes)


def save_conversion(result: ConversionResult, output_dir: str | os.PathLike) -> Path:
    """Write the converted model (safetensors weights and config) to `output_dir`, then reload it to verify.

    The image processor is the caller's to save (this package builds none; see [`EvaluationPreprocessing`]).
    """
    output_dir = Path(output_dir)
    result.model.save_pretrained(output_dir)
    # transformers annotates `from_pretrained` as returning the model only, not the (model, info) pair asked for.
    reloaded, info = cast(
        tuple[PreTrainedModel, dict[str, Any]],
        type(result.model).from_pretrained(output_dir, output_loading_info=True),
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"The saved model in {output_dir} does not reload cleanly: {problems}")
    return output_dir


__all__: list[str] = [
    "CONVERSION_KINDS",
    "ConversionResult",
    "EvaluationPreprocessing",
    "convert_checkpoint",
    "save_conversion",
]
