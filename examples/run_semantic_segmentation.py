#!/usr/bin/env python
"""Semantic segmentation with transformers' `UperNetForSemanticSegmentation` (UperNet + auxiliary FCN head) on a
`BeitBackbone` holding a pretrained BEiT v2 / BEiT backbone, trained with the `Trainer` and layer-wise lr decay,
evaluated by mIoU. The saved model uses native transformers classes only (pipelines and Hub widgets work).

The paper's ADE20K recipe (appendix G; from BEiT): 512 x 512 crops, 160k iterations at batch 16, AdamW lr
about 1e-4 ... 8e-4 (base/large), weight decay 0.05, layer decay 0.75 ... 0.85, warmup 1500 steps, linear decay,
drop path 0.1, relative position bias initialised from the pretraining table, features of (0-based) blocks
[3, 5, 7, 11] (base) or [7, 11, 15, 23] (large):

    python examples/run_semantic_segmentation.py --model_name_or_path path/to/beitv2-mim \
        --dataset_name scene_parse_150 --output_dir beitv2-ade20k --do_train --do_eval \
        --crop_size 512 --max_steps 160000 --per_device_train_batch_size 16 --learning_rate 4e-4 \
        --layer_decay 0.75 --weight_decay 0.05 --warmup_steps 1500 --lr_scheduler_type linear \
        --eval_strategy steps --eval_steps 16000 --save_steps 16000 --remove_unused_columns False

Data, in ADE20K format: `--dataset_name` with an image and an annotation column (`scene_parse_150`), or
`--data_dir` laid out like `ADEChallengeData2016` (`images/{training,validation}/*.jpg` and
`annotations/{training,validation}/*.png`, same file stems). Annotation value 0 ("other") is ignored and
classes 1..N become 0..N-1 (`--reduce_labels`, on by default as for ADE20K).

Augmentation (a simplification of mmsegmentation's pipeline): resize so that the shorter side is
`crop_size * s`, `s ~ U[0.5, 2.0]`, random `crop_size` crop (padded with the ignore index), horizontal flip.
Evaluation resizes image and annotation to `crop_size x crop_size` (bilinear / nearest) and measures mIoU at
that size, so numbers are close to but not the same as mmsegmentation's whole-image, original-size protocol.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
import torch
import transformers
from datasets import Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from downstream import (
    LayerDecayTrainer,
    SkipUnreadableImages,
    detect_column,
    load_native_beit,
    model_card_kwargs,
    parse_trainer_arguments,
    pretraining_normalisation,
    train_evaluate_and_save,
)
from image_datasets import decode_or_skip, new_decode_counts
from PIL import Image
from transformers import (
    BeitConfig,
    BeitImageProcessor,
    BeitModel,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    default_data_collator,
)

from processing.random_state import ProcessLocalRNG

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
IGNORE_INDEX = 255
# Feature levels of the reference UperNet configs, by backbone depth.
REFERENCE_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "BEiT v2 MIM checkpoint or native 'beit' checkpoint."})
    out_indices: list[int] | None = field(
        default=None, metadata={"help": "Blocks (0-based) feeding the 4 UperNet levels; reference values by default."}
    )
    layer_decay: float | None = field(
        default=0.75, metadata={"help": "Layer-wise lr decay (paper appendix G: 0.75-0.85); None: off."}
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth rate."})
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Weight of the auxiliary FCN head loss."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "e.g. scene_parse_150, or a local folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "ADEChallengeData2016-style folder."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(default="validation", metadata={"help": "Evaluation split name."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column; auto-detected."})
    annotation_column_name: str | None = field(default=None, metadata={"help": "Annotation column; auto-detected."})
    num_labels: int = field(default=150, metadata={"help": "Classes after label reduction (150 for ADE20K)."})
    id2label_file: str | None = field(default=None, metadata={"help": "JSON {id: name}; names default to ids."})
    reduce_labels: bool = field(default=True, metadata={"help": "Annotation 0 -> ignore, k -> k - 1."})
    crop_size: int = field(default=512, metadata={"help": "Training crop and evaluation size."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


def load_segmentation_data(data_args: DataArguments, cache_dir: str | None) -> DatasetDict:
    """`{split: Dataset(image, annotation)}` from the Hub or from an ADEChallengeData2016-style folder."""
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if data_args.data_dir is None:
        raise ValueError("Pass --dataset_name (e.g. scene_parse_150) or --data_dir (ADEChallengeData2016 layout).")
    root = Path(data_args.data_dir)
    splits = {}
    for split, folder in ((data_args.train_split, "training"), (data_args.validation_split, "validation")):
        image_dir, annotation_dir = root / "images" / folder, root / "annotations" / folder
        if not image_dir.is_dir():
            continue
        images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
        annotations = [annotation_dir / f"{path.stem}.png" for path in images]
        missing = [str(path) for path in annotations if not path.exists()]
        if missing:
            raise ValueError(f"{len(missing)} images of {image_dir} have no annotation, e.g. {missing[:3]}.")
        splits[split] = (
            Dataset.from_dict(
                {"image": [str(path) for path in images], "annotation": [str(path) for path in annotations]}
            )
            .cast_column("image", ImageFeature())
            .cast_column("annotation", ImageFeature())
        )
    if not splits:
        raise ValueError(f"No images/training or images/validation folder under {root}.")
    return DatasetDict(splits)


def reduce_annotation(annotation: Image.Image, reduce_labels: bool) -> np.ndarray:
    """`(H, W)` int64 class ids, with ADE20K's 0 ("other") mapped to the ignore index when reducing."""
    labels = np.asarray(annotation.convert("L") if annotation.mode not in ("L", "P", "I") else annotation)
    labels = labels.astype(np.int64)
    if reduce_labels:
        labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
    return labels


def build_segmentation_model(
    model_name_or_path: str,
    out_indices: list[int],
    crop_size: int,
    id2label: dict[int, str],
    auxiliary_loss_weight: float,
    drop_path_rate: float,
) -> UperNetForSemanticSegmentation:
    """transformers' `UperNetForSemanticSegmentation` on a `BeitBackbone` (with BEiT's 4-level FPN) holding the
    pretrained weights, all native classes, so the result loads and runs without this package.

    `out_indices` are 0-based blocks, as in the reference configs. `BeitBackbone` reads block `b` as stage `b + 1`
    (stage 0 is the patch embedding). `BeitForSemanticSegmentation` is not used: it reads the hidden state before
    each index, i.e. block `b - 2`, so the reference features [3, 5, 7, 11] would come from blocks 1, 3, 5, 9 and
    the last two blocks would get no gradient; the top block cannot be reached at all.
    """
    backbone = load_native_beit(model_name_or_path, BeitModel, image_size=crop_size, drop_path_rate=drop_path_rate)
    backbone_config = BeitConfig.from_dict(
        {
            **backbone.config.to_dict(),
            "out_indices": [index + 1 for index in out_indices],
            "out_features": None,
            "add_fpn": True,
            "reshape_hidden_states": True,
        }
    )
    config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=backbone_config.hidden_size,  # the reference head's channels (768 for base), not 512
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        use_auxiliary_head=True,
        auxiliary_loss_weight=auxiliary_loss_weight,
        loss_ignore_index=IGNORE_INDEX,
    )
    model = UperNetForSemanticSegmentation(config)
    missing, unexpected = model.backbone.beit.load_state_dict(backbone.state_dict(), strict=False)
    # The backbone has no pooling layer; everything else must match exactly.
    unexpected = [key for key in unexpected if not key.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(f"Backbone weights do not fit: missing {missing}, unexpected {unexpected}.")
    return model


def build_transforms(crop_size: int, reduce_labels: bool, image_processor: BeitImageProcessor, seed: int):
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    rng = ProcessLocalRNG(seed)

    def normalise(image: Image.Image) -> torch.Tensor:
        pixels = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels))

    def train_one(image: Image.Image, annotation: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        generator = rng.generator
        labels = reduce_annotation(annotation, reduce_labels)
        scale = crop_size * generator.uniform(0.5, 2.0) / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST), np.int64)
        pad_h, pad_w = max(0, crop_size - size[1]), max(0, crop_size - size[0])
        pixels = np.pad(np.asarray(image), ((0, pad_h), (0, pad_w), (0, 0)))
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        top = int(generator.integers(0, pixels.shape[0] - crop_size + 1))
        left = int(generator.integers(0, pixels.shape[1] - crop_size + 1))
        pixels = pixels[top : top + crop_size, left : left + crop_size]
        labels = labels[top : top + crop_size, left : left + crop_size]
        if generator.random() < 0.5:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        return normalise(Image.fromarray(np.ascontiguousarray(pixels))), torch.from_numpy(labels.copy())

    def eval_one(image: Image.Image, annotation: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.resize((crop_size, crop_size), Image.BILINEAR)
        labels = reduce_annotation(annotation, reduce_labels)
        labels = Image.fromarray(labels.astype(np.uint8)).resize((crop_size, crop_size), Image.NEAREST)
        return normalise(image), torch.from_numpy(np.asarray(labels, np.int64).copy())

    return train_one, eval_one


def main() -> None:
    model_args, data_args, training_args = parse_trainer_arguments((ModelArguments, DataArguments, TrainingArguments))
    # Images become pixel_values on the fly, so Trainer must not drop the raw columns; metrics run per batch
    # because full-resolution logits of a whole evaluation set do not fit in memory.
    training_args.remove_unused_columns = False
    training_args.batch_eval_metrics = True

    raw = load_segmentation_data(data_args, model_args.cache_dir)
    reference_split = raw[data_args.train_split if training_args.do_train else data_args.validation_split]
    columns = list(reference_split.features)
    image_column = detect_column(columns, data_args.image_column_name, ("image", "img", "pixel_values"), "image")
    annotation_column = detect_column(
        columns, data_args.annotation_column_name, ("annotation", "label", "segmentation", "mask"), "annotation"
    )
    if data_args.id2label_file is not None:
        id2label = {int(key): name for key, name in json.loads(Path(data_args.id2label_file).read_text()).items()}
    else:
        id2label = {index: str(index) for index in range(data_args.num_labels)}
    if len(id2label) != data_args.num_labels:
        raise ValueError(f"id2label has {len(id2label)} classes but --num_labels is {data_args.num_labels}.")

    source_config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
    depth = source_config.num_hidden_layers
    out_indices = model_args.out_indices or REFERENCE_OUT_INDICES.get(
        depth, [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    )
    if len(out_indices) != 4 or not all(0 <= index < depth for index in out_indices):
        raise ValueError(f"out_indices must be 4 block indices in [0, {depth}), got {out_indices}.")
    if sorted(set(out_indices)) != list(out_indices):
        raise ValueError(f"out_indices must be increasing (the 4 levels go from fine to coarse), got {out_indices}.")
    model = build_segmentation_model(
        model_args.model_name_or_path,
        out_indices,
        crop_size=data_args.crop_size,
        id2label=id2label,
        auxiliary_loss_weight=model_args.auxiliary_loss_weight,
        drop_path_rate=model_args.drop_path_rate,
    )
    image_mean, image_std = pretraining_normalisation(model_args.model_name_or_path, model_args.cache_dir)
    image_processor = BeitImageProcessor(
        size={"height": data_args.crop_size, "width": data_args.crop_size},
        resample=Image.BILINEAR,
        do_center_crop=False,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_reduce_labels=data_args.reduce_labels,
    )
    train_one, eval_one = build_transforms(
        data_args.crop_size, data_args.reduce_labels, image_processor, training_args.seed + training_args.process_index
    )

    # Decoded here, not inside `datasets`: an unreadable image or annotation drops that example (logged) instead
    # of stopping the run; annotations keep their own mode (class ids), images become RGB.
    raw = raw.cast_column(image_column, ImageFeature(decode=False)).cast_column(
        annotation_column, ImageFeature(decode=False)
    )

    decode_counts = new_decode_counts()

    def decode_pair(image_value, annotation_value, one):
        image = decode_or_skip(image_value, decode_counts)
        if image is None:
            return None, None
        annotation = decode_or_skip(annotation_value, decode_counts, convert=False, kind="annotation")
        if annotation is None:
            return None, None
        return one(image, annotation)

    def with_transform(split, one, limit):
        if limit is not None:
            split = split.select(range(min(limit, len(split))))

        def transform(batch):
            pairs = [
                decode_pair(image, annotation, one)
                for image, annotation in zip(batch[image_column], batch[annotation_column])
            ]
            return {"pixel_values": [pixels for pixels, _ in pairs], "labels": [labels for _, labels in pairs]}

        return split.with_transform(transform)

    train_dataset = (
        with_transform(raw[data_args.train_split], train_one, data_args.max_train_samples)
        if training_args.do_train
        else None
    )
    eval_dataset = (
        with_transform(raw[data_args.validation_split], eval_one, data_args.max_eval_samples)
        if training_args.do_eval
        else None
    )

    mean_iou = evaluate.load(os.path.join(METRICS_DIR, "mean_iou"))

    @torch.no_grad()
    def compute_metrics(eval_prediction, compute_result: bool):
        logits = torch.as_tensor(eval_prediction.predictions)
        labels = torch.as_tensor(eval_prediction.label_ids)
        upsampled = torch.nn.functional.interpolate(
            logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        mean_iou.add_batch(predictions=upsampled.argmax(dim=1).cpu().numpy(), references=labels.cpu().numpy())
        if not compute_result:
            return {}
        result = mean_iou.compute(num_labels=data_args.num_labels, ignore_index=IGNORE_INDEX)
        return {key: result[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}

    trainer = LayerDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=SkipUnreadableImages(default_data_collator),
        compute_metrics=compute_metrics,
        layer_decay=model_args.layer_decay,
        model_card={
            "kind": "segmentation",
            **model_card_kwargs(
                model_args.model_name_or_path,
                model.config.backbone_config,
                training_args.output_dir,
                training_args.hub_model_id,
                data_args.dataset_name,
                {
                    "learning_rate": training_args.learning_rate,
                    "max_steps": training_args.max_steps,
                    "per_device_batch_size": training_args.per_device_train_batch_size,
                    "weight_decay": training_args.weight_decay,
                    "layer_decay": model_args.layer_decay,
                    "drop_path_rate": model_args.drop_path_rate,
                    "crop_size": data_args.crop_size,
                    "out_indices": str(out_indices),
                },
                num_labels=data_args.num_labels,
            ),
        },
    )
    train_evaluate_and_save(trainer, training_args)


if __name__ == "__main__":
    main()
