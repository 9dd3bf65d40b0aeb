"""What the Trainer scripts (`run_image_classification.py`, `run_semantic_segmentation.py`) share: the model arguments,
loading a pretrained backbone as transformers' native BEiT and exporting it back, a `Trainer` with layer decay and
the model card, and the run's start and end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import evaluate
import numpy as np
import torch
import transformers
from datasets import Dataset, IterableDataset
from transformers import (
    AutoConfig,
    BeitForImageClassification,
    BeitModel,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.integrations import get_available_reporting_integrations
from transformers.trainer_utils import get_last_checkpoint

import modeling_beitv2  # noqa: F401
from finetuning.param_groups import layer_decay_param_groups
from pretraining.arguments import TRACKER_INSTALL_COMMANDS, check_hub_access, parse_arguments
from pretraining.model_cards import (
    LICENSE_HELP,
    check_hub_model_id,
    check_license,
    derived_family,
    hub_reference,
    write_model_card,
)
from processing.evaluation import evaluation_image_processor, saved_normalisation

# Registers the `beitv2` model type with the Auto classes: `model_card_kwargs` reads MIM checkpoints' configs.

if TYPE_CHECKING:
    import PIL.Image

    # Only annotations. The scripts build the PIL processor (`processing.evaluation`): `BeitImageProcessor` needs
    # torchvision.
    from transformers import BeitImageProcessorPil


logger = logging.getLogger(__name__)

# How to install each tracker `Trainer` can report to; the pretraining scripts' own (tensorboard, wandb) included.
_PIP_TRACKERS = ("clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "swanlab", "trackio")
INSTALL_COMMANDS = {**{name: f"pip install {name}" for name in _PIP_TRACKERS}, **TRACKER_INSTALL_COMMANDS}

# The `evaluate` metrics of the scripts, kept in this repository so that an evaluation needs no Hub access.
METRICS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics")


@dataclass
class FineTuningModelArguments:
    """The model flags of the `Trainer` fine-tuning scripts: the pretrained checkpoint (`downstream.load_native_beit`),
    the layer-wise lr decay (`LayerDecayTrainer`), stochastic depth, the cache folder and the license of the result."""

    model_name_or_path: str = field(
        metadata={"help": "BEiT v2 MIM checkpoint (model_type 'beitv2') or native 'beit' checkpoint, path or Hub id."}
    )
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise lr decay (0.65 base, 0.8 large in the paper). None: off."}
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth rate."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    license: str | None = field(default=None, metadata={"help": LICENSE_HELP})


def model_card_kwargs(
    model_name_or_path: str, dataset_name: str | None, training_args: dict, license: str | None = None
) -> dict:
    """Keyword arguments of `model_cards.write_model_card` shared by the fine-tuning scripts. The fine-tuned
    model's config, its Hub id and the measured metrics are added when the card is written
    (`LayerDecayTrainer.create_model_card`)."""
    check_license(license)  # now, not after the training
    config = AutoConfig.from_pretrained(model_name_or_path)
    base_model = hub_reference(model_name_or_path)
    return {
        # Only our MIM checkpoints say which paper they follow; a native `beit` one could be either.
        "family": derived_family(config),
        "base_model": base_model,
        "datasets": [dataset_name] if dataset_name else [],
        "source_note": f"Fine-tuned from {f'`{base_model}`' if base_model else 'a local checkpoint'} with this "
        "project's `examples/` scripts.",
        "training_args": training_args,
        "license": license,
    }


def load_metric(name: str) -> evaluate.EvaluationModule:
    """The `evaluate` metric `name` of `examples/metrics` (`accuracy`, `top_k_accuracy`, `mean_iou`)."""
    return evaluate.load(os.path.join(METRICS_DIR, name))


def pixel_normaliser(image_processor: BeitImageProcessorPil) -> Callable[[PIL.Image.Image], np.ndarray]:
    """The rescaling and normalisation of `image_processor`, for the training views it does not make: returns a
    function from an `(H, W, 3)` RGB image to its `(3, H, W)` float32 pixels `(pixel / 255 - mean) / std`."""
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]

    def normalise(image: PIL.Image.Image) -> np.ndarray:
        return (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std

    return normalise


class LayerDecayTrainer(Trainer):
    """`Trainer` with BEiT's parameter groups and soft-target cross entropy.

    - `create_optimizer` builds the weight-decay / layer-decay groups of `finetuning.param_groups`, each with its
      own initial lr, and hands them to the optimizer class `TrainingArguments.optim` selects.
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
        if model_card is not None:
            check_hub_model_id(self.args.hub_model_id)  # the card's usage snippet loads it: fail before training

    # Keywords only, as `Trainer` calls it: `**unused` stands for the superclass's keyword parameters.
    def create_model_card(self, **unused: Any) -> None:  # type: ignore[override]
        if self.model_card is None:
            return super().create_model_card(**unused)
        if not self.is_world_process_zero():
            return None
        measured = {}  # the last evaluation's numbers; `model_cards` keeps the evaluation metrics among them
        for entry in self.state.log_history:
            measured.update({key: round(value, 4) for key, value in entry.items() if key.startswith("eval_")})
        write_model_card(
            cast(str, self.args.output_dir),  # `TrainingArguments` fills in a default folder
            **self.model_card,
            config=cast(PreTrainedModel, self.model).config,
            # `init_hf_repo` resolves the full repo id of --push_to_hub; else the id the user named, if any.
            hub_model_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            metrics=measured,
        )
        return None

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = cast(PreTrainedModel, self.model if model is None else model)
            groups = layer_decay_param_groups(
                opt_model,
                weight_decay=self.args.weight_decay,
                learning_rate=self.args.learning_rate,
                layer_decay=self.layer_decay,
                # A segmentation model (UperNet) keeps the backbone's depth in its backbone config.
                num_layers=getattr(opt_model.config, "backbone_config", opt_model.config).num_hidden_layers,
            )
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

    Decoding happens in our transform (`pretraining.data.decode_or_skip`, which logs each bad image once with its
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


def fine_tuning_trainer(
    model: PreTrainedModel,
    training_args: TrainingArguments,
    *,
    model_name_or_path: str,
    dataset_name: str | None,
    layer_decay: float | None,
    drop_path_rate: float | None,
    license: str | None,
    train_dataset: Dataset | IterableDataset | None,
    eval_dataset: Dataset | IterableDataset | None,
    image_processor: BeitImageProcessorPil,
    compute_metrics: Callable[..., dict[str, float]],
    card_kind: str,
    card_settings: dict,
    train_data_collator: Callable[[list[dict]], dict] | None = None,
) -> LayerDecayTrainer:
    """The `LayerDecayTrainer` of a fine-tuning script: parameter groups with `--layer_decay`, batches of the
    readable images (`SkipUnreadableImages`, also around `train_data_collator` when given), `image_processor`
    saved with the model, and a model card of `card_kind` ("classifier", "segmentation") whose training section
    lists the settings every fine-tuning run has (lr, global batch size, length, weight decay, layer decay, drop
    path rate), then the script's own `card_settings`. `training_args` is the `Trainer`'s own settings object."""
    length = (
        {"max_steps": training_args.max_steps}
        if training_args.max_steps > 0
        else {"epochs": training_args.num_train_epochs}
    )
    card_training_args = {
        "learning_rate": training_args.learning_rate,
        "global_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size),
        **length,
        "weight_decay": training_args.weight_decay,
        "layer_decay": layer_decay,
        "drop_path_rate": drop_path_rate,
        **card_settings,
    }
    card = model_card_kwargs(model_name_or_path, dataset_name, card_training_args, license=license)
    return LayerDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=SkipUnreadableImages(default_data_collator),
        compute_metrics=compute_metrics,
        layer_decay=layer_decay,
        train_data_collator=None if train_data_collator is None else SkipUnreadableImages(train_data_collator),
        model_card={"kind": card_kind, **card},
    )


def check_trainer_start(
    report_to: list[str] | None, push_to_hub: bool, hub_model_id: str | None, output_dir: str, token: str | None
) -> None:
    """Stop in the first seconds, with one line, on what would otherwise fail after the model and the data are
    loaded (a `--report_to` tracker that is not installed: `Trainer` raises when it builds the callback) or after
    the training (`--push_to_hub` without a usable token, repo or network, e.g. offline).

    Raises:
        SystemExit: with a one-line message naming the fix.
    """
    available = set(get_available_reporting_integrations())
    for name in report_to or []:
        if name in INSTALL_COMMANDS and name not in available:
            raise SystemExit(
                f"--report_to {name}: the {name} package is not installed. Install it with "
                f"{INSTALL_COMMANDS[name]}, or pass --report_to none."
            )
    check_hub_access(push_to_hub, hub_model_id, output_dir, token)


def parse_trainer_arguments(dataclass_types: tuple[type, ...]) -> tuple:
    """:func:`pretraining.arguments.parse_arguments` for a `Trainer` script (the last type is its
    `TrainingArguments`), then logging at INFO on the processes that `Trainer` logs from and at WARNING on the
    others, then :func:`check_trainer_start`."""
    parsed = parse_arguments(dataclass_types)
    level = logging.INFO if parsed[-1].should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    training_args = parsed[-1]
    check_trainer_start(
        training_args.report_to,
        training_args.push_to_hub,
        training_args.hub_model_id,
        training_args.output_dir,
        training_args.hub_token,  # `TrainingArguments` calls the Hub token hub_token
    )
    return parsed


def train_evaluate_and_save(trainer: Trainer) -> None:
    """``--do_train`` (resuming from ``--resume_from_checkpoint``, else the newest checkpoint in the output folder)
    with the final model, metrics and state saved; ``--do_eval``; then the model card and the optional Hub push
    (all as ``trainer.args`` says)."""
    training_args = trainer.args
    if training_args.do_train:
        last_checkpoint = (
            get_last_checkpoint(training_args.output_dir)
            if os.path.isdir(cast(str, training_args.output_dir))
            else None
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


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained backbones as transformers' native BEiT


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
    source: modeling_beitv2.BeitV2ForMaskedImageModeling | BeitModel
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
