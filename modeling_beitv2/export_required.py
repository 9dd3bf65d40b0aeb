"""Point users who load a BEiT v2 pretraining checkpoint as a task model to the native export.

A masked-image-modeling checkpoint (`model_type: "beitv2"`) has no task head, and its one shared relative position
bias must be copied into every layer before fine-tuning. Without this module, `AutoModelForImageClassification`
rejects such a folder with transformers' generic "Unrecognized configuration class" message, which names neither
the problem nor the fix. Registering `BeitV2NeedsNativeExport` for the task Auto classes turns that into an error
that names `convert_mim_to_native_beit` and the fine-tuning scripts.

Exporting silently on load was considered and rejected: the export takes fine-tuning choices (resolution, labels,
drop path) and drops the pretraining heads, so it should be a visible step whose result is saved and reused.
"""

from __future__ import annotations

from typing import Any, NoReturn

from .configuration_beitv2 import BeitV2Config


def native_export_message(path: str | None = None) -> str:
    """The explanation and the fix, for a BEiT v2 MIM checkpoint (at `path`, when known) built as a task model."""
    source = repr(path) if path is not None else "'path/to/beitv2-mim'"
    subject = path if path is not None else "This"
    return (
        f"{subject} is a BEiT v2 masked-image-modeling checkpoint (model_type 'beitv2'): it has no task head and its "
        "shared relative position bias must first be copied into every layer, so it does not load as "
        "an image-classification or segmentation model. Either fine-tune it with examples/run_image_classification.py "
        "(or examples/run_semantic_segmentation.py), which export it for you, or export it once to a native "
        "transformers `beit` folder that AutoModelForImageClassification, pipeline() and transformers' own "
        "examples load:\n"
        "    from transformers import BeitForImageClassification\n"
        "    from modeling_beitv2 import BeitV2ForMaskedImageModeling, convert_mim_to_native_beit\n"
        f"    mim = BeitV2ForMaskedImageModeling.from_pretrained({source})\n"
        "    convert_mim_to_native_beit(mim, BeitForImageClassification).save_pretrained('beitv2-native')\n"
        "(`downstream.export_native_checkpoint` in examples/ also saves a matching native image processor)."
    )


class BeitV2NeedsNativeExport:
    """Registered for `AutoModelForImageClassification` and `AutoModelForSemanticSegmentation` with `BeitV2Config`;
    every way of building it raises a `ValueError` naming the native export (see the module docstring)."""

    config_class = BeitV2Config

    def __init__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(native_export_message())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(native_export_message(str(pretrained_model_name_or_path)))

    @classmethod
    def _from_config(cls, config: BeitV2Config, **kwargs: Any) -> NoReturn:
        raise ValueError(native_export_message())


__all__ = ["BeitV2NeedsNativeExport", "native_export_message"]
