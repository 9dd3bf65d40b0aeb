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
classes 1..N become 0..N-1 (`--reduce_labels`, on by default as for ADE20K). With `--do_eval` and no evaluation
split, `--train_val_split` (default 0.15) of the training split is held out, seeded by `--seed`.

Augmentation (a simplification of mmsegmentation's pipeline): resize so that the shorter side is
`crop_size * s`, `s ~ U[0.5, 2.0]`, random `crop_size` crop (padded with the ignore index), horizontal flip.
Evaluation resizes image and annotation to `crop_size x crop_size` (bilinear / nearest) and measures mIoU at
that size, so numbers are close to but not the same as mmsegmentation's whole-image, original-size protocol.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers
from datasets import Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    BeitConfig,
    BeitModel,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from finetuning.data import LabelledDataArguments, detect_column, first_examples, prepare_splits
from finetuning.trainer import (
    FineTuningModelArguments,
    fine_tuning_trainer,
    load_metric,
    load_native_beit,
    parse_trainer_arguments,
    pixel_normaliser,
    train_evaluate_and_save,
)
from pretraining.data import decode_or_skip, new_decode_counts
from processing.augmentation import SegmentationAugmentation
from processing.evaluation import evaluation_image_processor, saved_normalisation
from processing.random_state import ProcessLocalRNG

if TYPE_CHECKING:
    from transformers import BeitImageProcessorPil  # see `finetuning.trainer`: imported for the annotation only

IGNORE_INDEX = 255
# Feature levels of the reference UperNet configs, by backbone depth.
REFERENCE_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(FineTuningModelArguments):
    """The shared fine-tuning model flags, plus the UperNet feature levels and auxiliary loss."""

    # Redeclared for its default: the segmentation recipe always decays the lr by layer.
    layer_decay: float | None = field(
        default=0.75, metadata={"help": "Layer-wise lr decay (paper appendix G: 0.75-0.85); None: off."}
    )
    out_indices: list[int] | None = field(
        default=None, metadata={"help": "Blocks (0-based) feeding the 4 UperNet levels; reference values by default."}
    )
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Weight of the auxiliary FCN head loss."})


@dataclass
class DataArguments(LabelledDataArguments):
    """The shared data flags (`--dataset_name` e.g. scene_parse_150), plus an ADE20K-style folder, the annotation
    column and its classes, and the crop size."""

    data_dir: str | None = field(default=None, metadata={"help": "ADEChallengeData2016-style folder."})
    annotation_column_name: str | None = field(default=None, metadata={"help": "Annotation column; auto-detected."})
    num_labels: int = field(default=150, metadata={"help": "Classes after label reduction (150 for ADE20K)."})
    id2label_file: str | None = field(default=None, metadata={"help": "JSON {id: name}; names default to ids."})
    reduce_labels: bool = field(default=True, metadata={"help": "Annotation 0 -> ignore, k -> k - 1."})
    crop_size: int = field(default=512, metadata={"help": "Training crop and evaluation size."})


def load_segmentation_data(
    *,
    dataset_name: str | None,
    dataset_config_name: str | None,
    data_dir: str | None,
    train_split: str,
    validation_split: str,
    cache_dir: str | None,
) -> DatasetDict:
    """`{split: Dataset(image, annotation)}` from the Hub or from an ADEChallengeData2016-style folder."""
    if dataset_name is not None:
        return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if data_dir is None:
        raise ValueError("Pass --dataset_name (e.g. scene_parse_150) or --data_dir (ADEChallengeData2016 layout).")
    root = Path(data_dir)
    splits = {}
    for split, folder in ((train_split, "training"), (validation_split, "validation")):
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


def build_transforms(crop_size: int, reduce_labels: bool, image_processor: BeitImageProcessorPil, seed: int):
    to_pixels = pixel_normaliser(image_processor)
    # `datasets` transforms get no per-example generator: each process (rank, DataLoader worker) draws its own.
    rng = ProcessLocalRNG(seed)
    augmentation = SegmentationAugmentation(crop_size, scale_range=(0.5, 2.0), ignore_index=IGNORE_INDEX)

    def normalise(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(to_pixels(image)))

    def train_one(image: Image.Image, annotation: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = augmentation(image, reduce_annotation(annotation, reduce_labels), rng.generator)
        return normalise(image), torch.from_numpy(labels)

    def eval_one(image: Image.Image, annotation: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.resize((crop_size, crop_size), Image.Resampling.BILINEAR)
        labels = reduce_annotation(annotation, reduce_labels)
        label_image = Image.fromarray(labels.astype(np.uint8)).resize((crop_size, crop_size), Image.Resampling.NEAREST)
        return normalise(image), torch.from_numpy(np.asarray(label_image, np.int64).copy())

    return train_one, eval_one


def main() -> None:
    model_args, data_args, training_args = parse_trainer_arguments((ModelArguments, DataArguments, TrainingArguments))
    # Images become pixel_values on the fly, so Trainer must not drop the raw columns; metrics run per batch
    # because full-resolution logits of a whole evaluation set do not fit in memory.
    training_args.remove_unused_columns = False
    training_args.batch_eval_metrics = True

    raw = load_segmentation_data(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_dir=data_args.data_dir,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        cache_dir=model_args.cache_dir,
    )
    raw = prepare_splits(
        raw,
        data_args.splits(),
        training_args.seed,
        do_train=training_args.do_train,
        do_eval=training_args.do_eval,
        validation_flags="an images/validation folder under --data_dir",
    )
    columns = list(next(iter(raw.values())).features)  # every split has the same columns
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
    image_mean, image_std = saved_normalisation(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    # The whole image resized to crop_size x crop_size (bilinear), as the evaluation below does.
    image_processor = evaluation_image_processor(
        data_args.crop_size,
        image_mean,
        image_std,
        crop_pct=None,
        resample="bilinear",
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
        split = first_examples(split, limit)

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

    mean_iou = load_metric("mean_iou")

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
        card_kind="segmentation",
        card_settings={"crop_size": data_args.crop_size, "out_indices": str(out_indices)},
    )
    train_evaluate_and_save(trainer)


if __name__ == "__main__":
    main()
