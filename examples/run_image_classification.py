#!/usr/bin/env python
"""Fine-tune a pretrained BEiT v2 / BEiT backbone for image classification with the `Trainer`.

The recipe of the BEiT v2 paper (appendix F; ViT-B/16 on ImageNet-1k: 100 epochs, lr 5e-4 at batch 1024, warmup
20 epochs, AdamW (0.9, 0.999), weight decay 0.05, layer decay 0.65 (0.8 for ViT-L), drop path 0.1, label
smoothing 0.1, RandAugment 9/0.5, mixup 0.8, cutmix 1.0, random erasing 0.25):

    python examples/run_image_classification.py \
        --model_name_or_path path/to/beitv2-mim-checkpoint --dataset_name imagenet-1k \
        --output_dir beitv2-base-in1k --do_train --do_eval \
        --learning_rate 2e-3 --per_device_train_batch_size 128 --num_train_epochs 100 --warmup_steps 0.2 \
        --weight_decay 0.05 --layer_decay 0.65 --drop_path_rate 0.1 --label_smoothing 0.1 \
        --rand_augment_num_ops 2 --rand_augment_magnitude 9 --random_erasing 0.25 --mixup_alpha 0.8 \
        --cutmix_alpha 1.0 --lr_scheduler_type cosine --eval_strategy epoch --save_strategy epoch \
        --remove_unused_columns False --bf16

(lr 2e-3 is the reference's 5e-4 per 256 images scaled to a global batch of 1024.)

The starting checkpoint may be a BEiT v2 MIM checkpoint of this package, a native transformers `beit`
checkpoint or an official one converted to either. The model trained and saved is always transformers' own
`BeitForImageClassification` (per-layer relative position bias initialised from the shared pretraining table,
mean pooling, head weight scaled by `--head_init_scale`), saved with a `BeitImageProcessor`, so the output
folder works with `pipeline("image-classification")` and the Hub widget without this package.

Layer-wise lr decay: parameter group lr = `learning_rate * layer_decay ** (L + 1 - layer_id)` with layer id 0
for the embeddings, `i + 1` for block `i` and `L + 1` for the pooler norm and head. The groups are built in
`downstream.LayerDecayTrainer.create_optimizer`, which DeepSpeed also calls when its config has no `optimizer`
section.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
from datasets import Image as ImageFeature
from downstream import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    LayerDecayTrainer,
    SkipUnreadableImages,
    class_names,
    detect_column,
    evaluation_image_processor,
    init_classifier_head,
    load_image_classification_data,
    load_native_beit,
    model_card_kwargs,
    parse_trainer_arguments,
    pretraining_normalisation,
    train_evaluate_and_save,
)
from image_datasets import decode_or_skip, new_decode_counts
from PIL import Image
from transformers import (
    BeitForImageClassification,
    BeitImageProcessor,
    TrainingArguments,
    default_data_collator,
)

from processing.random_state import ProcessLocalRNG
from processing.transforms import RandAugment, RandomErasing, RandomHorizontalFlip, RandomResizedCrop

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "BEiT v2 MIM checkpoint (model_type 'beitv2') or native 'beit' checkpoint, path or Hub id."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Fine-tuning resolution; defaults to the checkpoint's. Bias tables are resized."},
    )
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise lr decay (0.65 base, 0.8 large in the paper). None: off."}
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth rate."})
    head_init_scale: float = field(default=0.001, metadata={"help": "Scale of the classifier's initial weight."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub or a local datasets folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images in class folders."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images in class folders."})
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the evaluation split."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column; auto-detected if unset."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column; auto-detected if unset."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (needs --max_steps)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer when streaming."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize to image_size / crop_pct, centre crop."})
    rand_augment_num_ops: int = field(default=2, metadata={"help": "RandAugment operations per image (0: off)."})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude in [0, 10] (timm's m9)."})
    rand_augment_magnitude_std: float = field(default=0.5, metadata={"help": "Gaussian noise on the magnitude."})
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup Beta(alpha, alpha); 0: off."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta(alpha, alpha); 0: off."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the training targets."})


def build_transforms(data_args: DataArguments, image_size: int, image_processor: BeitImageProcessor, seed: int):
    """Training augmentation (the reference's RandomResizedCrop → flip → RandAugment → normalise → erasing) and
    the evaluation transform, which is the saved `BeitImageProcessor` itself so that evaluation and
    `pipeline()` see identical inputs."""
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    rng = ProcessLocalRNG(seed)
    crop, flip = RandomResizedCrop(image_size), RandomHorizontalFlip()
    # 11 magnitude bins make magnitude 9 the same strength as timm's `rand-m9-mstd0.5` used by the reference.
    rand_augment = RandAugment(
        data_args.rand_augment_num_ops,
        data_args.rand_augment_magnitude,
        num_magnitude_bins=11,
        magnitude_std=data_args.rand_augment_magnitude_std,
    )
    erase = RandomErasing(data_args.random_erasing)

    def train_one(image: Image.Image) -> torch.Tensor:
        generator = rng.generator
        image = rand_augment(flip(crop(image, generator), generator), generator)
        pixel_values = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(erase(pixel_values, generator), dtype=np.float32))

    def eval_one(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(image_processor(image, return_tensors="np")["pixel_values"][0])

    return train_one, eval_one


def recipe_summary(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """The training choices worth showing on the model card."""
    length = (
        {"max_steps": training_args.max_steps}
        if training_args.max_steps > 0
        else {"epochs": training_args.num_train_epochs}
    )
    return {
        "learning_rate": training_args.learning_rate,
        "global_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size),
        **length,
        "weight_decay": training_args.weight_decay,
        "layer_decay": model_args.layer_decay,
        "drop_path_rate": model_args.drop_path_rate,
        "image_size": model_args.image_size or "pretraining size",
        "rand_augment": f"{data_args.rand_augment_num_ops} ops, magnitude {data_args.rand_augment_magnitude}",
        "random_erasing": data_args.random_erasing,
        "mixup / cutmix": f"{data_args.mixup_alpha} / {data_args.cutmix_alpha}",
        "label_smoothing": data_args.label_smoothing,
    }


def main() -> None:
    model_args, data_args, training_args = parse_trainer_arguments((ModelArguments, DataArguments, TrainingArguments))
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to derive epochs from).")
    if training_args.remove_unused_columns:
        # The transform turns the image column into pixel_values on the fly; Trainer must not drop it first.
        training_args.remove_unused_columns = False

    raw = load_image_classification_data(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_dir,
        data_args.validation_dir,
        streaming=data_args.streaming,
        cache_dir=model_args.cache_dir,
    )
    reference_split = raw[data_args.train_split if training_args.do_train else data_args.validation_split]
    columns = list(reference_split.features)
    image_column = detect_column(columns, data_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = detect_column(columns, data_args.label_column_name, LABEL_COLUMN_CANDIDATES, "label")
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
    init_classifier_head(model.classifier, model_args.head_init_scale)
    image_size = model.config.image_size
    image_mean, image_std = pretraining_normalisation(model_args.model_name_or_path, model_args.cache_dir)
    image_processor = evaluation_image_processor(image_size, image_mean, image_std, data_args.crop_pct)
    # Each rank draws its own augmentations (the data differs per rank already; the random crops must too).
    augmentation_seed = training_args.seed + training_args.process_index
    train_one, eval_one = build_transforms(data_args, image_size, image_processor, augmentation_seed)

    # Images are decoded by `decode_or_skip` (odd modes converted to RGB, unreadable ones logged, counted and
    # dropped by the `SkipUnreadableImages` collator) rather than inside `datasets`, where one bad file stops the run.
    raw = raw.cast_column(image_column, ImageFeature(decode=False))
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
            if data_args.max_train_samples is not None:
                train_split = train_split.take(data_args.max_train_samples)
        else:
            train_split = train_split.shuffle(seed=training_args.seed)
            if data_args.max_train_samples is not None:
                train_split = train_split.select(range(min(data_args.max_train_samples, len(train_split))))
        train_dataset = with_transform(train_split, train_one)
    if training_args.do_eval:
        eval_split = raw[data_args.validation_split]
        if data_args.max_eval_samples is not None:
            eval_split = (
                eval_split.take(data_args.max_eval_samples)
                if data_args.streaming
                else eval_split.select(range(min(data_args.max_eval_samples, len(eval_split))))
            )
        eval_dataset = with_transform(eval_split, eval_one)

    train_collator = None
    if data_args.mixup_alpha > 0 or data_args.cutmix_alpha > 0:
        from processing.collators import MixupCutmixCollator

        train_collator = SkipUnreadableImages(
            MixupCutmixCollator(
                num_classes=len(labels),
                mixup_alpha=data_args.mixup_alpha,
                cutmix_alpha=data_args.cutmix_alpha,
                label_smoothing=data_args.label_smoothing,
                seed=augmentation_seed,
            )
        )
    else:
        training_args.label_smoothing_factor = data_args.label_smoothing

    accuracy = evaluate.load(os.path.join(METRICS_DIR, "accuracy"))
    top_k = [1, 5] if len(labels) > 5 else [1]

    def compute_metrics(eval_prediction):
        return accuracy.compute(
            predictions=eval_prediction.predictions, references=eval_prediction.label_ids, top_k=top_k
        )

    trainer = LayerDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=SkipUnreadableImages(default_data_collator),
        compute_metrics=compute_metrics,
        layer_decay=model_args.layer_decay,
        train_data_collator=train_collator,
        model_card={
            "kind": "classifier",
            **model_card_kwargs(
                model_args.model_name_or_path,
                model.config,
                training_args.output_dir,
                training_args.hub_model_id,
                data_args.dataset_name,
                recipe_summary(model_args, data_args, training_args),
            ),
        },
    )

    train_evaluate_and_save(trainer, training_args)


if __name__ == "__main__":
    main()
