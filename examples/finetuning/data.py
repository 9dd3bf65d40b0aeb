"""The labelled image data of the stage-3 scripts (fine-tuning, linear probe, kNN, segmentation): their shared data
flags, declared once in the dataclasses each script's data arguments extend (`LabelledDataArguments`,
`ClassificationDataArguments`), the loading of a `datasets` dataset or of class folders
(`load_image_classification_data`), the hold-out of an evaluation split when the data has none (`prepare_splits`),
the truncation of a split (`first_examples`), and the image / label columns and class names a script reads
(`detect_column`, `class_names`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

from pretraining.data import split_off_validation

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "jpg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "cls", "target")


def check_train_val_split(train_val_split: float) -> None:
    """Raise a ValueError unless `train_val_split` (the held-out fraction, see `prepare_splits`) is in [0, 1)."""
    if not 0.0 <= train_val_split < 1.0:
        raise ValueError(f"--train_val_split must be in [0, 1) (0: no hold-out), got {train_val_split}.")


@dataclass(frozen=True)
class SplitSettings:
    """The splits :func:`prepare_splits` checks: the training and evaluation split names, and the fraction of the
    training split held out as the evaluation split when the data has none (in [0, 1); 0 turns the hold-out off)."""

    train_split: str = "train"
    validation_split: str = "validation"
    train_val_split: float = 0.15

    def __post_init__(self) -> None:
        check_train_val_split(self.train_val_split)


@dataclass
class LabelledDataArguments:
    """The data flags of every stage-3 script: the `datasets` dataset, the splits that train and evaluate, the
    hold-out of an evaluation split when the data has none (`prepare_splits`), the image column and the truncation
    of each split (`first_examples`). Each script's data arguments extend it with their own source and columns."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub or a local datasets folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the evaluation split."})
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "When an evaluation needs a split the data does not have: the fraction of the training split "
            "held out for evaluation (seeded by --seed); 0: no hold-out."
        },
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column; auto-detected if unset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})

    def __post_init__(self) -> None:
        check_train_val_split(self.train_val_split)

    def splits(self) -> SplitSettings:
        """The split flags, as :func:`prepare_splits` takes them."""
        return SplitSettings(self.train_split, self.validation_split, self.train_val_split)


@dataclass
class ClassificationDataArguments(LabelledDataArguments):
    """The data flags of the image-classification scripts (fine-tuning, linear probe): images with class labels,
    from a `datasets` dataset or from class folders (`load_image_classification_data`)."""

    train_dir: str | None = field(default=None, metadata={"help": "Training images in class folders."})
    validation_dir: str | None = field(default=None, metadata={"help": "Evaluation images in class folders."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column; auto-detected if unset."})


def load_image_classification_data(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_split: str = "train",
    validation_split: str = "validation",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Load `dataset_name` from the Hub (or a local `datasets` folder), else the `imagefolder`-style class
    folders `train_dir` and `validation_dir` as the splits `train_split` and `validation_split`."""
    if dataset_name is not None:
        return load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir)
    data_files = {}
    if train_dir is not None:
        data_files[train_split] = f"{train_dir}/**"
    if validation_dir is not None:
        data_files[validation_split] = f"{validation_dir}/**"
    if not data_files:
        raise ValueError("Pass --dataset_name, or --train_dir and/or --validation_dir.")
    return load_dataset("imagefolder", data_files=data_files, streaming=streaming, cache_dir=cache_dir)


def prepare_splits(
    raw: DatasetDict | IterableDatasetDict,
    splits: SplitSettings,
    seed: int,
    do_train: bool,
    do_eval: bool,
    validation_flags: str = "--validation_dir",
    image_column: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Check that the splits a run needs exist, holding out part of the training split for evaluation when the
    data has no evaluation split, as transformers' image-classification example does.

    Args:
        raw: The loaded splits.
        splits: Names the training and evaluation splits (`train_split`, `validation_split`) and the fraction
            of the training split held out as the evaluation split when evaluation is requested and the data has
            none (`train_val_split`, in [0, 1); 0 turns the hold-out off).
        seed: Seeds the hold-out, so a training run and a later `--do_eval` run hold out the same examples.
        do_train, do_eval: Which splits are needed.
        validation_flags: How this script's user provides an evaluation split (named in the error).
        image_column: The image column of a streamed dataset, cast with `Image(decode=False)`: a stream is split by
            a hash of each image's bytes or path (`pretraining.data.split_off_validation`); in-memory data is split by
            `Dataset.train_test_split`.

    Returns:
        `raw`, or a copy whose `train_split` lost the held-out examples and whose `validation_split` holds them.

    Raises:
        ValueError: naming the missing split, the splits there are and the flags that provide one.
    """
    train_split, validation_split, train_val_split = (
        splits.train_split,
        splits.validation_split,
        splits.train_val_split,
    )
    available = list(raw)
    if (do_train or (do_eval and validation_split not in raw)) and train_split not in raw:
        raise ValueError(
            f"The data has no training split {train_split!r} (splits: {available}); name one with --train_split."
        )
    if not do_eval or validation_split in raw:
        return raw
    if train_val_split == 0:
        raise ValueError(
            f"The evaluation needs a split {validation_split!r}, which the data does not have (splits: "
            f"{available}). Name one with --validation_split, give one with {validation_flags}, or hold out part of "
            f"{train_split!r} with --train_val_split (e.g. 0.15)."
        )
    logger.info(
        "No %r split: holding out %g of %r for evaluation (--train_val_split, seed %d).",
        validation_split,
        train_val_split,
        train_split,
        seed,
    )
    prepared = dict(raw)
    if isinstance(raw, IterableDatasetDict):
        prepared[train_split], prepared[validation_split] = split_off_validation(
            raw[train_split], train_val_split, seed, image_column
        )
        return IterableDatasetDict(prepared)
    held_out = raw[train_split].train_test_split(test_size=train_val_split, seed=seed)
    prepared[train_split], prepared[validation_split] = held_out["train"], held_out["test"]
    return DatasetDict(prepared)


def first_examples(split: Dataset | IterableDataset, limit: int | None) -> Dataset | IterableDataset:
    """The first `limit` examples of `split` (`--max_train_samples`, `--max_eval_samples`); all of them when `limit`
    is None or larger than the split."""
    if limit is None:
        return split
    if isinstance(split, IterableDataset):
        return split.take(limit)
    return split.select(range(min(limit, len(split))))


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
