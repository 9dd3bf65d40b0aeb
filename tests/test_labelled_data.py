"""The labelled data of the stage-3 scripts (examples/finetuning/data.py): the shared data flags, class-folder loading, the
evaluation hold-out, the truncation of a split, and the columns and class names a script reads."""

import io

import datasets
import PIL.Image
import pytest

from finetuning.data import (
    IMAGE_COLUMN_CANDIDATES,
    LabelledDataArguments,
    SplitSettings,
    class_names,
    detect_column,
    first_examples,
    load_image_classification_data,
    prepare_splits,
)
from pretraining.arguments import parse_arguments


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepare_splits_holds_out_a_seeded_part_of_the_training_split():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"index": list(range(40))})})
    data_args = LabelledDataArguments(train_val_split=0.25)
    split = prepare_splits(raw, data_args.splits(), seed=3, do_train=True, do_eval=True)
    train, held_out = list(split["train"]["index"]), list(split["validation"]["index"])
    assert len(held_out) == 10 and sorted(train + held_out) == list(range(40))
    # The same seed holds out the same examples (a --do_eval-only run later evaluates on what training never saw).
    again = prepare_splits(raw, data_args.splits(), seed=3, do_train=False, do_eval=True)
    assert list(again["validation"]["index"]) == held_out
    other_seed = prepare_splits(raw, data_args.splits(), seed=4, do_train=True, do_eval=True)
    assert list(other_seed["validation"]["index"]) != held_out
    # Nothing is held out when there is an evaluation split or no evaluation.
    assert prepare_splits(split, data_args.splits(), seed=3, do_train=True, do_eval=True) is split
    assert prepare_splits(raw, data_args.splits(), seed=3, do_train=True, do_eval=False) is raw
    # The split names come from the arguments too.
    renamed = prepare_splits(
        datasets.DatasetDict({"fit": raw["train"]}),
        SplitSettings(train_split="fit", validation_split="dev", train_val_split=0.25),
        seed=3,
        do_train=True,
        do_eval=True,
    )
    assert set(renamed) == {"fit", "dev"} and list(renamed["dev"]["index"]) == held_out


def test_prepare_splits_holds_out_part_of_a_stream_by_image_hash():
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})

    def rows():
        for index in range(60):
            yield {"image": {"bytes": png_bytes(index), "path": None}, "label": index}

    raw = datasets.IterableDatasetDict({"train": datasets.IterableDataset.from_generator(rows, features=features)})
    data_args = LabelledDataArguments(train_val_split=0.3)
    split = prepare_splits(raw, data_args.splits(), seed=0, do_train=True, do_eval=True, image_column="image")
    assert isinstance(split, datasets.IterableDatasetDict)
    train = [row["label"] for row in split["train"]]
    held_out = [row["label"] for row in split["validation"]]
    assert sorted(train + held_out) == list(range(60))
    assert 5 <= len(held_out) <= 35  # a binomial draw around 18


def test_prepare_splits_names_the_missing_split_and_the_flags_that_give_one():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"index": [0, 1, 2]})})
    with pytest.raises(ValueError, match=r"split 'validation'.*\['train'\].*--validation_dir.*--train_val_split"):
        prepare_splits(raw, SplitSettings(train_val_split=0.0), seed=0, do_train=True, do_eval=True)
    with pytest.raises(ValueError, match="no training split 'training'.*--train_split"):
        prepare_splits(raw, SplitSettings(train_split="training"), seed=0, do_train=True, do_eval=False)
    with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
        LabelledDataArguments(train_val_split=1.0)
    data_args = LabelledDataArguments()
    data_args.train_val_split = 1.0  # set after the dataclass checked it
    with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
        prepare_splits(raw, data_args.splits(), seed=0, do_train=True, do_eval=True)


def test_every_script_declares_the_shared_data_flags_once_with_their_check():
    """The data flags of the three scripts come from one dataclass (`LabelledDataArguments`, extended by
    `ClassificationDataArguments`): the same names, the same defaults and the same `--train_val_split` check
    everywhere."""
    import run_image_classification
    import run_linear_probe
    import run_semantic_segmentation

    required = {
        run_image_classification.DataArguments: [],
        run_semantic_segmentation.DataArguments: [],
        run_linear_probe.ProbeArguments: ["--model_name_or_path", "m", "--output_dir", "out"],
    }
    for dataclass_type, flags in required.items():
        (args,) = parse_arguments((dataclass_type,), args=[*flags, "--dataset_name", "d", "--max_eval_samples", "5"])
        assert isinstance(args, LabelledDataArguments)
        assert (args.dataset_name, args.train_split, args.validation_split) == ("d", "train", "validation")
        assert (args.train_val_split, args.max_eval_samples) == (0.15, 5)
        with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
            parse_arguments((dataclass_type,), args=[*flags, "--train_val_split", "1"])


def test_class_folders_load_as_the_named_splits(tmp_path):
    for split, colour in (("train", "red"), ("train", "blue"), ("val", "red")):
        (tmp_path / split / colour).mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4), colour).save(tmp_path / split / colour / "0.png")
    raw = load_image_classification_data(
        train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"),
        train_split="fit",
        validation_split="dev",
        cache_dir=str(tmp_path / "cache"),
    )
    assert {name: len(split) for name, split in raw.items()} == {"fit": 2, "dev": 1}
    with pytest.raises(ValueError, match="Pass --dataset_name, or --train_dir and/or --validation_dir"):
        load_image_classification_data()


def test_first_examples_truncates_in_memory_and_streamed_splits():
    split = datasets.Dataset.from_dict({"index": list(range(5))})
    assert first_examples(split, None) is split
    assert first_examples(split, 3)["index"] == [0, 1, 2]
    assert first_examples(split, 10)["index"] == list(range(5))
    stream = split.to_iterable_dataset()
    assert [row["index"] for row in first_examples(stream, 2)] == [0, 1]
    assert [row["index"] for row in first_examples(stream, 10)] == list(range(5))


def test_detect_column_takes_the_named_column_else_the_first_candidate_present():
    columns = ["img", "label", "image"]
    assert detect_column(columns, None, IMAGE_COLUMN_CANDIDATES, "image") == "image"  # candidates' order wins
    assert detect_column(columns, "img", IMAGE_COLUMN_CANDIDATES, "image") == "img"
    with pytest.raises(ValueError, match=r"--image_column_name 'photo' is not a column; columns are \['img'"):
        detect_column(columns, "photo", IMAGE_COLUMN_CANDIDATES, "image")
    with pytest.raises(ValueError, match=r"image column among \['label'\]; pass --image_column_name"):
        detect_column(["label"], None, IMAGE_COLUMN_CANDIDATES, "image")


def test_class_names_come_from_a_class_label_else_from_integer_ids():
    named = datasets.Dataset.from_dict(
        {"label": [1, 0]}, features=datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog"])})
    )
    assert class_names(named, "label") == ["cat", "dog"]
    assert class_names(datasets.Dataset.from_dict({"label": [2, 0, 2]}), "label") == ["0", "1", "2"]
    with pytest.raises(ValueError, match="must be a ClassLabel or hold integer class ids >= 0"):
        class_names(datasets.Dataset.from_dict({"label": ["cat", "dog"]}), "label")
    with pytest.raises(ValueError, match="streamed dataset is not a ClassLabel"):
        class_names(datasets.Dataset.from_dict({"label": [0, 1]}).to_iterable_dataset(), "label")
