"""The model a stage-3 script (fine-tuning, linear probe, kNN, segmentation) starts from: a pretrained backbone
loaded as a native transformers `beit` model (`load_native_beit`), or exported as a native `beit` folder with its
evaluation image processor (`export_native_checkpoint`), and the reference init of a fresh classifier head
(`init_classifier_head`). The scripts' other shared code lives beside it, one job a module: labelled data and its
splits in `labelled_data`, the `Trainer` side of the fine-tuning scripts in `fine_tuning`. Scripts import what they
share from these helper modules, never from one another.

A starting checkpoint can be
- a BEiT v2 / BEiT MIM checkpoint of this package (`model_type: "beitv2"`), exported with
  `modeling_beitv2.convert_mim_to_native_beit`;
- any native transformers `beit` checkpoint (`BeitModel`, `BeitForMaskedImageModeling`,
  `BeitForImageClassification`, or an official checkpoint converted to one of these): its backbone is loaded into
  a `BeitModel` and exported the same way, so a shared relative position bias is copied into every layer and
  resized when the fine-tuning resolution differs.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, BeitForImageClassification, BeitModel, PreTrainedModel

import modeling_beitv2  # registers the `beitv2` model type with the Auto classes: AutoConfig reads MIM checkpoints
from processing.evaluation import evaluation_image_processor, saved_normalisation


def load_native_beit(
    model_name_or_path: str,
    model_class: type[PreTrainedModel] = BeitModel,
    image_size: int | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """Load a pretrained backbone as a stock transformers `model_class` (`model_type: "beit"`).

    The result has one relative position bias per layer (initialised from the shared table when the checkpoint
    has one), mean pooling, no [MASK] embedding, and fresh heads. `config_overrides` go to its `BeitConfig`
    (`num_labels`, `id2label`, `drop_path_rate`, `out_indices`...).
    """
    config = AutoConfig.from_pretrained(model_name_or_path)
    if config.model_type == "beitv2":
        source = modeling_beitv2.BeitV2ForMaskedImageModeling.from_pretrained(model_name_or_path)
    elif config.model_type == "beit":
        # Mean pooling as in the fine-tuning recipe: the pretraining-time final LayerNorm is dropped and the
        # pooling LayerNorm starts fresh, like the reference's `fc_norm`.
        source = BeitModel.from_pretrained(model_name_or_path, add_pooling_layer=False, use_mean_pooling=True)
    else:
        raise ValueError(
            f"{model_name_or_path} has model_type {config.model_type!r}; expected a 'beitv2' (MIM) or 'beit' checkpoint."
        )
    return modeling_beitv2.convert_mim_to_native_beit(source, model_class, image_size=image_size, **config_overrides)


def export_native_checkpoint(
    model_name_or_path: str,
    output_dir: str,
    model_class: type[PreTrainedModel] = BeitForImageClassification,
    image_size: int | None = None,
    crop_pct: float | None = 0.875,
    **config_overrides,
) -> PreTrainedModel:
    """Save a pretrained backbone as a native transformers `beit` folder: `model_class` weights (see
    `load_native_beit`) and the matching evaluation image processor (`processing.evaluation`, with the checkpoint's
    pretraining mean/std).

    The folder needs nothing from this project: `AutoModelForImageClassification.from_pretrained(output_dir,
    num_labels=..., ignore_mismatched_sizes=True)`, `AutoImageProcessor` and transformers' own
    `run_image_classification.py` example start from it. Returns the exported model.
    """
    model = load_native_beit(model_name_or_path, model_class, image_size=image_size, **config_overrides)
    image_mean, image_std = saved_normalisation(model_name_or_path)
    model.save_pretrained(output_dir)
    evaluation_image_processor(model.config.image_size, image_mean, image_std, crop_pct=crop_pct).save_pretrained(
        output_dir
    )
    return model


@torch.no_grad()
def init_classifier_head(classifier: torch.nn.Linear, init_scale: float) -> None:
    """The reference head init: truncated normal (std 0.02) scaled by `init_scale`, zero bias."""
    torch.nn.init.trunc_normal_(classifier.weight, std=0.02)
    classifier.weight.mul_(init_scale)
    torch.nn.init.zeros_(classifier.bias)
