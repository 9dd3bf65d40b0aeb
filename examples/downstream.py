"""What the stage-3 scripts (fine-tuning, linear probe, kNN, segmentation) share: loading a pretrained backbone
as a native transformers `beit` model, loading labelled image data, and the `Trainer` scripts' argument parsing,
`Trainer` subclass (`LayerDecayTrainer`), collator wrapper (`SkipUnreadableImages`) and train / evaluate / save
ending. Scripts import what they share from here, never from one another.

A starting checkpoint can be
- a BEiT v2 / BEiT MIM checkpoint of this package (`model_type: "beitv2"`), exported with
  `modeling_beitv2.convert_mim_to_native_beit`;
- any native transformers `beit` checkpoint (`BeitModel`, `BeitForMaskedImageModeling`,
  `BeitForImageClassification`, or an official checkpoint converted to one of these): its backbone is loaded into
  a `BeitModel` and exported the same way, so a shared relative position bias is copied into every layer and
  resized when the fine-tuning resolution differs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import PIL.Image
import torch
import transformers
from datasets import ClassLabel, DatasetDict, IterableDatasetDict, load_dataset
from param_groups import apply_lr_scale, build_param_groups
from pretraining_arguments import parse_arguments
from transformers import (
    AutoConfig,
    BeitImageProcessor,
    BeitModel,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.trainer_utils import get_last_checkpoint

import modeling_beitv2  # registers the `beitv2` model type with the Auto classes: AutoConfig reads MIM checkpoints
from model_cards import write_model_card

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "jpg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "cls", "target")


def pretraining_normalisation(
    model_name_or_path: str, cache_dir: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean and std a checkpoint was pretrained with, from its saved image processor.

    A backbone sees images normalised the way it was trained: BEiT v2 checkpoints use ImageNet's mean/std, BEiT
    (v1) ones 0.5/0.5. A checkpoint without an image processor config gets ImageNet's.
    """
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(model_name_or_path, cache_dir=cache_dir)
    except OSError:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = processor_dict.get("image_mean"), processor_dict.get("image_std")
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(mean), tuple(std)


def evaluation_image_processor(
    image_size: int, image_mean: tuple[float, ...], image_std: tuple[float, ...], crop_pct: float = 0.875
) -> BeitImageProcessor:
    """The reference evaluation transform as a native processor: shorter side resized (bicubic) to
    `floor(image_size / crop_pct)`, centre crop `image_size`, then `image_mean`/`image_std`.

    Resizing the shorter side keeps the aspect ratio; a `{"height", "width"}` size would squash non-square images.
    Centre cropping is explicit because `BeitImageProcessor` does not crop by default in transformers 5.
    """
    return BeitImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(math.floor(image_size / crop_pct))},
        resample=PIL.Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_reduce_labels=False,
    )


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


SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


def model_card_kwargs(
    model_name_or_path: str,
    native_config: PretrainedConfig,
    output_dir: str,
    hub_model_id: str | None,
    dataset_name: str | None,
    training_args: dict,
    num_labels: int | None = None,
) -> dict:
    """Keyword arguments of `model_cards.write_model_card` shared by the fine-tuning scripts (measured metrics are
    added when the card is written). `native_config` is the backbone's; `num_labels` defaults to its own."""
    config = AutoConfig.from_pretrained(model_name_or_path)
    return {
        "model_id": hub_model_id or output_dir,
        # Only our MIM checkpoints say which paper they follow; a native `beit` one could be either.
        "family": "beitv2" if config.model_type == "beitv2" and config.use_patch_aggregation else None,
        "size": SIZE_NAMES.get(config.hidden_size),
        "base_model": None if os.path.isdir(model_name_or_path) else model_name_or_path,
        "datasets": [dataset_name] if dataset_name else [],
        "source_note": f"Fine-tuned from `{model_name_or_path}` with this project's `examples/` scripts.",
        "training_args": training_args,
        "architecture": {
            "hidden_size": native_config.hidden_size,
            "num_hidden_layers": native_config.num_hidden_layers,
            "num_attention_heads": native_config.num_attention_heads,
            "image_size": native_config.image_size,
            "patch_size": native_config.patch_size,
            "num_labels": num_labels if num_labels is not None else native_config.num_labels,
        },
    }


@torch.no_grad()
def init_classifier_head(classifier: torch.nn.Linear, init_scale: float) -> None:
    """The reference head init: truncated normal (std 0.02) scaled by `init_scale`, zero bias."""
    torch.nn.init.trunc_normal_(classifier.weight, std=0.02)
    classifier.weight.mul_(init_scale)
    torch.nn.init.zeros_(classifier.bias)


def load_image_classification_data(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Load a dataset from the Hub (or a local `datasets` folder) or from `imagefolder`-style class folders."""
    if dataset_name is not None:
        return load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir)
    data_files = {}
    if train_dir is not None:
        data_files["train"] = f"{train_dir}/**"
    if validation_dir is not None:
        data_files["validation"] = f"{validation_dir}/**"
    if not data_files:
        raise ValueError("Pass --dataset_name, or --train_dir and/or --validation_dir.")
    return load_dataset("imagefolder", data_files=data_files, streaming=streaming, cache_dir=cache_dir)


def detect_column(column_names: list[str], requested: str | None, candidates: tuple[str, ...], what: str) -> str:
    """Return `requested` if given (checking it exists), else the first of `candidates` present."""
    if requested is not None:
        if requested not in column_names:
            raise ValueError(f"--{what}_column_name {requested!r} is not a column; columns are {column_names}.")
        return requested
    for name in candidates:
        if name in column_names:
            return name
    raise ValueError(
        f"Could not find the {what} column among {column_names}; pass --{what}_column_name "
        f"(looked for {list(candidates)})."
    )


def class_names(split, label_column: str) -> list[str]:
    """Class names from a `ClassLabel` feature, else `"0"`...`"n-1"` for integer labels `0..n-1`."""
    feature = split.features[label_column] if split.features is not None else None
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if not hasattr(split, "unique"):
        raise ValueError(
            f"Label column {label_column!r} of a streamed dataset is not a ClassLabel, so the classes are unknown; "
            "use a dataset whose label feature is a ClassLabel."
        )
    values = split.unique(label_column)
    if not all(isinstance(value, int) and value >= 0 for value in values):
        raise ValueError(
            f"Label column {label_column!r} must be a ClassLabel or hold integer class ids >= 0; "
            f"found values such as {values[:5]}."
        )
    return [str(index) for index in range(max(values) + 1)]


class LayerDecayTrainer(Trainer):
    """`Trainer` with BEiT's parameter groups and soft-target cross entropy.

    - `create_optimizer` builds the weight-decay / layer-decay groups of `param_groups.build_param_groups`, each
      with its own initial lr, and hands them to the optimizer class `TrainingArguments.optim` selects.
    - `compute_loss` takes soft labels `(batch, num_classes)` (mixup/cutmix/label smoothing) with
      `-sum(target * log_softmax(logits))`; integer labels (class ids, segmentation maps) go to the model's own loss.
    - `train_data_collator` is used for the training dataloader only, so evaluation sees unmixed hard labels.
    - `create_model_card` (also called by `push_to_hub`) writes this project's card from `model_cards/`, with the
      `eval_*` numbers of the last evaluation as measured results.
    """

    def __init__(
        self,
        *args,
        layer_decay: float | None = None,
        train_data_collator: Callable[[list[dict]], dict] | None = None,
        model_card: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        # transformers sees `**kwargs` in BEiT's forward and would then count `labels != -100` as the number of
        # items (B x C for mixup's soft labels) and skip dividing by the accumulation steps; BEiT ignores it.
        self.model_accepts_loss_kwargs = False
        self.layer_decay = layer_decay
        self.train_data_collator = train_data_collator
        self.model_card = model_card

    def create_model_card(self, **unused) -> None:
        if self.model_card is None:
            return super().create_model_card(**unused)
        if not self.is_world_process_zero():
            return None
        measured = {}
        for entry in self.state.log_history:
            measured.update({key: round(value, 4) for key, value in entry.items() if key.startswith("eval_")})
        for key in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss"):
            measured.pop(key, None)
        write_model_card(self.args.output_dir, **self.model_card, metrics=measured)
        return None

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(
                opt_model,
                weight_decay=self.args.weight_decay,
                layer_decay=self.layer_decay,
                # A segmentation model (UperNet) keeps the backbone's depth in its backbone config.
                num_layers=getattr(opt_model.config, "backbone_config", opt_model.config).num_hidden_layers,
            )
            apply_lr_scale(groups, self.args.learning_rate)
            for group in groups:
                group.pop("names")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self):
        if self.train_data_collator is None:
            return super().get_train_dataloader()
        eval_collator, self.data_collator = self.data_collator, self.train_data_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = eval_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or not labels.is_floating_point():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(pixel_values=inputs["pixel_values"])
        per_example = -(labels * torch.log_softmax(outputs.logits.float(), dim=-1)).sum(dim=-1)
        loss = per_example.sum() / num_items_in_batch if num_items_in_batch is not None else per_example.mean()
        return (loss, outputs) if return_outputs else loss


class SkipUnreadableImages:
    """Collator wrapper that drops the examples whose image could not be decoded (`pixel_values` is None).

    Decoding happens in our transform (`image_datasets.decode_or_skip`, which logs each bad image once with its
    reason and the running count) rather than inside `datasets`, where one truncated file would stop a whole
    stream; a bad image costs its batch one example.
    """

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        kept = [feature for feature in features if feature["pixel_values"] is not None]
        if not kept:
            raise ValueError(f"All {len(features)} images of a batch were unreadable; check the dataset.")
        return self.collate(kept)


def parse_trainer_arguments(dataclass_types: tuple[type, ...]) -> tuple:
    """:func:`pretraining_arguments.parse_arguments` for a `Trainer` script (the last type is its
    `TrainingArguments`), then logging at INFO on the processes that `Trainer` logs from and at WARNING on the
    others."""
    parsed = parse_arguments(dataclass_types)
    level = logging.INFO if parsed[-1].should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    return parsed


def train_evaluate_and_save(trainer: Trainer, training_args: TrainingArguments) -> None:
    """``--do_train`` (resuming from ``--resume_from_checkpoint``, else the newest checkpoint in the output folder)
    with the final model, metrics and state saved; ``--do_eval``; then the model card and the optional Hub push."""
    if training_args.do_train:
        last_checkpoint = (
            get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        )
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Resuming from {last_checkpoint}.")
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub()
