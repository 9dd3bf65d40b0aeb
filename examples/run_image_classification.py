#!/usr/bin/env python
"""Fine-tune a pretrained BEiT v2 / BEiT backbone for image classification with the `Trainer`.

`--recipe` picks what the training adds to the data. The default, `simple`, is a random resized crop and a
horizontal flip with hard labels: what a small dataset or a short run needs. `--recipe paper` is the recipe of the
BEiT v2 paper (appendix F) on top of it: RandAugment (2 ops, magnitude 9, std 0.5), random erasing 0.25, mixup 0.8,
cutmix 1.0 and label smoothing 0.1; each of `--rand_augment_num_ops`, `--random_erasing`, `--mixup_alpha`,
`--cutmix_alpha` and `--label_smoothing` overrides its recipe value. The paper's full ImageNet-1k run (ViT-B/16:
100 epochs, lr 5e-4 at batch 1024, warmup 20 epochs, AdamW (0.9, 0.999), weight decay 0.05, layer decay 0.65 (0.8
for ViT-L), drop path 0.1):

    python examples/run_image_classification.py \
        --model_name_or_path path/to/beitv2-mim-checkpoint --dataset_name imagenet-1k \
        --output_dir beitv2-base-in1k --do_train --do_eval --recipe paper \
        --learning_rate 2e-3 --per_device_train_batch_size 128 --num_train_epochs 100 --warmup_steps 0.2 \
        --weight_decay 0.05 --layer_decay 0.65 --drop_path_rate 0.1 \
        --lr_scheduler_type cosine --eval_strategy epoch --save_strategy epoch --bf16

(lr 2e-3 is the reference's 5e-4 per 256 images scaled to a global batch of 1024.)

Data: `--dataset_name` (Hub or local `datasets` folder) or `--train_dir` / `--validation_dir` class folders. With
`--do_eval` and no evaluation split, `--train_val_split` (default 0.15) of the training split is held out, seeded by
`--seed`, as in transformers' own example.

The starting checkpoint may be a BEiT v2 MIM checkpoint of this package, a native transformers `beit`
checkpoint or an official one converted to either. The model trained and saved is always transformers' own
`BeitForImageClassification` (per-layer relative position bias initialised from the shared pretraining table,
mean pooling, head weight scaled by `--head_init_scale`), saved with transformers' `BeitImageProcessorPil`
(`processing.evaluation`; the evaluation here uses the same processor), so the output folder works with
`pipeline("image-classification")` and the Hub widget without this package, with or without torchvision.

Layer-wise lr decay: parameter group lr = `learning_rate * layer_decay ** (L + 1 - layer_id)` with layer id 0
for the embeddings, `i + 1` for block `i` and `L + 1` for the pooler norm and head. The groups are built in
`fine_tuning.LayerDecayTrainer.create_optimizer`, which DeepSpeed also calls when its config has no `optimizer`
section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image
from transformers import BeitForImageClassification, TrainingArguments

from finetuning.data import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    ClassificationDataArguments,
    class_names,
    detect_column,
    first_examples,
    load_image_classification_data,
    prepare_splits,
)
from finetuning.trainer import (
    FineTuningModelArguments,
    fine_tuning_trainer,
    init_classifier_head,
    load_metric,
    load_native_beit,
    parse_trainer_arguments,
    pixel_normaliser,
    train_evaluate_and_save,
)
from pretraining.data import decode_or_skip, new_decode_counts
from processing.augmentation import ClassificationAugmentation
from processing.evaluation import evaluation_image_processor, saved_normalisation
from processing.random_state import ProcessLocalRNG
from processing.transforms import RandomErasing

if TYPE_CHECKING:
    from transformers import BeitImageProcessorPil  # see `finetuning.trainer`: imported for the annotation only

logger = logging.getLogger(__name__)

# What `--recipe` turns on. `paper` is the BEiT v2 ImageNet-1k fine-tuning recipe (appendix F); `simple` keeps
# only the random resized crop and flip, which suits small datasets and short runs far better: mixup, cutmix and
# heavy augmentation need many epochs to pay off.
RECIPES: dict[str, dict[str, float]] = {
    "simple": {
        "rand_augment_num_ops": 0,
        "random_erasing": 0.0,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "label_smoothing": 0.0,
    },
    "paper": {
        "rand_augment_num_ops": 2,
        "random_erasing": 0.25,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "label_smoothing": 0.1,
    },
}


def _recipe_defaults(name: str) -> str:
    """`--help` text of a flag that `--recipe` sets: its value in each recipe."""
    return "default from --recipe: " + ", ".join(f"{recipe} {values[name]:g}" for recipe, values in RECIPES.items())


@dataclass
class ModelArguments(FineTuningModelArguments):
    """The shared fine-tuning model flags, plus the resolution and the classifier's initialisation."""

    image_size: int | None = field(
        default=None,
        metadata={"help": "Fine-tuning resolution; defaults to the checkpoint's. Bias tables are resized."},
    )
    head_init_scale: float = field(default=0.001, metadata={"help": "Scale of the classifier's initial weight."})


@dataclass
class DataArguments(ClassificationDataArguments):
    """The shared classification data flags, plus streaming, the evaluation crop and the training recipe."""

    streaming: bool = field(default=False, metadata={"help": "Stream the data (needs --max_steps)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer when streaming."})
    crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize to image_size / crop_pct, centre crop."})
    recipe: str = field(
        default="simple",
        metadata={
            "help": "Training augmentation and targets. simple: random resized crop and horizontal flip only, for "
            "small data and short runs. paper: the BEiT v2 ImageNet-1k recipe, which adds RandAugment, random "
            "erasing, mixup, cutmix and label smoothing. Each of those five flags overrides its recipe value.",
            "choices": list(RECIPES),
        },
    )
    rand_augment_num_ops: int | None = field(
        default=None,
        metadata={"help": f"RandAugment operations per image, 0: off ({_recipe_defaults('rand_augment_num_ops')})."},
    )
    rand_augment_magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude in [0, 10] (timm's m9)."})
    rand_augment_magnitude_std: float = field(default=0.5, metadata={"help": "Gaussian noise on the magnitude."})
    random_erasing: float | None = field(
        default=None, metadata={"help": f"Random erasing probability ({_recipe_defaults('random_erasing')})."}
    )
    mixup_alpha: float | None = field(
        default=None, metadata={"help": f"Mixup Beta(alpha, alpha), 0: off ({_recipe_defaults('mixup_alpha')})."}
    )
    cutmix_alpha: float | None = field(
        default=None, metadata={"help": f"CutMix Beta(alpha, alpha), 0: off ({_recipe_defaults('cutmix_alpha')})."}
    )
    label_smoothing: float | None = field(
        default=None,
        metadata={"help": f"Label smoothing of the training targets ({_recipe_defaults('label_smoothing')})."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # Set now: the recipe filled in those left at None.
        assert self.rand_augment_num_ops is not None and self.random_erasing is not None
        assert self.mixup_alpha is not None and self.cutmix_alpha is not None and self.label_smoothing is not None
        if self.rand_augment_num_ops < 0 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                "--rand_augment_num_ops, --mixup_alpha and --cutmix_alpha must be >= 0 (0: off), got "
                f"{self.rand_augment_num_ops}, {self.mixup_alpha}, {self.cutmix_alpha}."
            )
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"--random_erasing is a probability in [0, 1], got {self.random_erasing}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")

    def recipe_summary(self, image_size: int | None) -> dict:
        """The classification choices worth showing on the model card, after the settings every fine-tuning run
        has (`finetuning.trainer.fine_tuning_trainer`); `image_size` is --image_size."""
        return {
            "image_size": image_size or "pretraining size",
            "recipe": self.recipe,
            "rand_augment": f"{self.rand_augment_num_ops} ops, magnitude {self.rand_augment_magnitude}",
            "random_erasing": self.random_erasing,
            "mixup / cutmix": f"{self.mixup_alpha} / {self.cutmix_alpha}",
            "label_smoothing": self.label_smoothing,
        }


def build_transforms(
    image_size: int,
    image_processor: BeitImageProcessorPil,
    seed: int,
    *,
    rand_augment_num_ops: int,
    rand_augment_magnitude: int,
    rand_augment_magnitude_std: float,
    random_erasing: float,
):
    """Training augmentation (the reference's RandomResizedCrop → flip → RandAugment → normalise → erasing) and
    the evaluation transform, which is the saved `BeitImageProcessor` itself so that evaluation and
    `pipeline()` see identical inputs."""
    normalise = pixel_normaliser(image_processor)
    # `datasets` transforms get no per-example generator: each process (rank, DataLoader worker) draws its own.
    rng = ProcessLocalRNG(seed)
    # Its 11 magnitude bins make magnitude 9 the strength of timm's `rand-m9-mstd0.5` used by the reference.
    augmentation = ClassificationAugmentation(
        image_size,
        rand_augment_num_ops=rand_augment_num_ops,
        rand_augment_magnitude=rand_augment_magnitude,
        rand_augment_magnitude_std=rand_augment_magnitude_std,
    )
    erase = RandomErasing(random_erasing)

    def train_one(image: Image.Image) -> torch.Tensor:
        generator = rng.generator
        pixel_values = normalise(augmentation(image, generator))
        return torch.from_numpy(np.ascontiguousarray(erase(pixel_values, generator), dtype=np.float32))

    def eval_one(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(image_processor(image, return_tensors="np")["pixel_values"][0])

    return train_one, eval_one


def main() -> None:
    model_args, data_args, training_args = parse_trainer_arguments((ModelArguments, DataArguments, TrainingArguments))
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to derive epochs from).")
    if training_args.remove_unused_columns:
        # The transform turns the image column into pixel_values on the fly; Trainer must not drop it first.
        training_args.remove_unused_columns = False

    raw = load_image_classification_data(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        streaming=data_args.streaming,
        cache_dir=model_args.cache_dir,
    )
    columns = list(next(iter(raw.values())).features)  # every split has the same columns
    image_column = detect_column(columns, data_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = detect_column(columns, data_args.label_column_name, LABEL_COLUMN_CANDIDATES, "label")
    # Images are decoded by `decode_or_skip` (odd modes converted to RGB, unreadable ones logged, counted and
    # dropped by the `SkipUnreadableImages` collator) rather than inside `datasets`, where one bad file stops the run.
    # Cast before the hold-out: a stream is split by a hash of the undecoded image.
    raw = raw.cast_column(image_column, ImageFeature(decode=False))
    raw = prepare_splits(
        raw,
        data_args.splits(),
        training_args.seed,
        do_train=training_args.do_train,
        do_eval=training_args.do_eval,
        image_column=image_column,
    )
    reference_split = raw[data_args.train_split if training_args.do_train else data_args.validation_split]
    labels = class_names(reference_split, label_column)
    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}

    model = load_native_beit(
        model_args.model_name_or_path,
        BeitForImageClassification,
        image_size=model_args.image_size,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        drop_path_rate=model_args.drop_path_rate,
    )
    classifier = model.classifier
    assert isinstance(classifier, torch.nn.Linear)  # the head of num_labels >= 1 classes (an Identity only for 0)
    init_classifier_head(classifier, model_args.head_init_scale)
    image_size = model.config.image_size
    image_mean, image_std = saved_normalisation(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    image_processor = evaluation_image_processor(image_size, image_mean, image_std, crop_pct=data_args.crop_pct)
    # Each rank draws its own augmentations (the data differs per rank already; the random crops must too).
    augmentation_seed = training_args.seed + training_args.process_index
    train_one, eval_one = build_transforms(
        image_size,
        image_processor,
        augmentation_seed,
        rand_augment_num_ops=data_args.rand_augment_num_ops,
        rand_augment_magnitude=data_args.rand_augment_magnitude,
        rand_augment_magnitude_std=data_args.rand_augment_magnitude_std,
        random_erasing=data_args.random_erasing,
    )

    decode_counts = new_decode_counts()

    def decode_or_none(value, one):
        image = decode_or_skip(value, decode_counts)
        return None if image is None else one(image)

    def with_transform(split, one):
        def transform(batch):
            return {
                "pixel_values": [decode_or_none(value, one) for value in batch[image_column]],
                "labels": [int(label) for label in batch[label_column]],
            }

        if data_args.streaming:
            return split.map(transform, batched=True, remove_columns=list(split.features))
        return split.with_transform(transform)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_split = raw[data_args.train_split]
        if data_args.streaming:
            train_split = train_split.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
        else:
            train_split = train_split.shuffle(seed=training_args.seed)
        train_dataset = with_transform(first_examples(train_split, data_args.max_train_samples), train_one)
    if training_args.do_eval:
        eval_split = first_examples(raw[data_args.validation_split], data_args.max_eval_samples)
        eval_dataset = with_transform(eval_split, eval_one)

    train_collator = None
    if data_args.mixup_alpha > 0 or data_args.cutmix_alpha > 0:
        from processing.collators import MixupCutmixCollator

        train_collator = MixupCutmixCollator(
            num_classes=len(labels),
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
            label_smoothing=data_args.label_smoothing,
            seed=augmentation_seed,
        )
    else:
        training_args.label_smoothing_factor = data_args.label_smoothing

    # `accuracy` takes class ids, like the Hub's metric of that name; top-5 needs the scores (and more than 5 classes).
    accuracy = load_metric("accuracy")
    top_k_accuracy = load_metric("top_k_accuracy") if len(labels) > 5 else None

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits, references = eval_prediction.predictions, eval_prediction.label_ids
        metrics = accuracy.compute(predictions=np.argmax(logits, axis=-1), references=references)
        if top_k_accuracy is not None:
            metrics.update(top_k_accuracy.compute(predictions=logits, references=references, top_k=[5]))
        return metrics

    trainer = fine_tuning_trainer(
        model,
        training_args,
        model_name_or_path=model_args.model_name_or_path,
        dataset_name=data_args.dataset_name,
        layer_decay=model_args.layer_decay,
        drop_path_rate=model_args.drop_path_rate,
        license=model_args.license,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        image_processor=image_processor,
        compute_metrics=compute_metrics,
        card_kind="classifier",
        card_settings=data_args.recipe_summary(model_args.image_size),
        train_data_collator=train_collator,
    )

    train_evaluate_and_save(trainer)


if __name__ == "__main__":
    main()
