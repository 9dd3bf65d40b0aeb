"""The pretraining scripts' arguments (examples/pretraining/arguments.py): parse-time validation, precision flags."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import pytest

from pretraining.arguments import DataArguments, PretrainingArguments, check_range, parse_arguments

CLASSES = (DataArguments, PretrainingArguments)


@pytest.fixture(autouse=True)
def no_launcher_precision(monkeypatch):
    # `accelerate launch` exports this; the tests must not depend on the shell they run in.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def parse(*flags: str, classes: tuple[type, ...] = CLASSES):
    return parse_arguments(classes, ["--train_dir", "images", "--output_dir", "out", *flags])


def training_args(**overrides) -> PretrainingArguments:
    return PretrainingArguments(**{"output_dir": "out", **overrides})


# ---------------------------------------------------------------------------------------------------------------
# check_range


def test_check_range_messages():
    check_range("drop_path_rate", None, low=0)  # unset optional argument
    check_range("drop_path_rate", 0.0, low=0, high=1, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^--drop_path_rate must be in \[0, 1\), got 1\.0\.$"):
        check_range("drop_path_rate", 1.0, low=0, high=1, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^--mask_ratio must be in \(0, 1\], got 0\.$"):
        check_range("--mask_ratio", 0, low=0, high=1, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^--logging_steps must be >= 1, got 0\.$"):
        check_range("logging_steps", 0, low=1)
    with pytest.raises(ValueError, match=r"^--lr must be > 0, got -1\. Use a positive value\.$"):
        check_range("lr", -1, low=0, low_inclusive=False, note="Use a positive value")
    with pytest.raises(ValueError, match=r"^--x must be <= 2, got 3\.$"):
        check_range("x", 3, high=2)
    with pytest.raises(ValueError, match="got nan"):  # NaN compares False with everything
        check_range("x", math.nan, low=0)
    with pytest.raises(ValueError, match="must be a number, got True"):
        check_range("x", True, low=0)
    with pytest.raises(ValueError, match=r"must be a number, got '1e-4' of type str \(in YAML write"):
        check_range("learning_rate", "1e-4", low=0)


# ---------------------------------------------------------------------------------------------------------------
# Parse-time validation (fault 7)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--logging_steps", "0"], r"--logging_steps must be >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be >= 1, got 0"),
        (["--max_consecutive_nonfinite", "0"], r"--max_consecutive_nonfinite must be >= 1, got 0"),
        (["--save_steps", "-5"], r"--save_steps must be >= 0, got -5\. 0 saves only at the end"),
        (["--save_total_limit", "0"], r"--save_total_limit must be >= 1"),
        (["--eval_steps", "0", "--do_eval", "--train_val_split", "0.1"], r"--eval_steps must be >= 1"),
        (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be >= 1"),
        (["--per_device_eval_batch_size", "0"], r"--per_device_eval_batch_size must be >= 1"),
        (["--learning_rate", "0"], r"--learning_rate must be > 0"),
        (["--min_learning_rate=-1e-5"], r"--min_learning_rate must be >= 0"),
        (["--weight_decay", "-0.1"], r"--weight_decay must be >= 0"),
        (["--adam_beta2", "1.0"], r"--adam_beta2 must be in \[0, 1\)"),
        (["--adam_epsilon", "0"], r"--adam_epsilon must be > 0"),
        (["--max_grad_norm", "-1"], r"--max_grad_norm must be >= 0, got -1\.0\. 0 disables clipping"),
        (["--max_steps", "0"], r"--max_steps must be >= 1, got 0\. Use -1 to train for --num_train_epochs"),
        (["--num_train_epochs", "0"], r"--num_train_epochs must be > 0"),
        (["--warmup_steps", "-0.1"], r"--warmup_steps must be >= 0"),
        (["--warmup_steps", "2.5"], r"--warmup_steps must be a whole number of steps \(>= 1\) or a fraction"),
        (["--lr_scheduler_type", "cosine_typo"], r"--lr_scheduler_type must be one of cosine_with_min_lr, "),
        # Needs an eval metric at every step, which this loop does not give the scheduler.
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], r"--lr_scheduler_type must be one of"),
        (["--report_to", "mlflow"], r"--report_to must be one of none, tensorboard, wandb, all; got 'mlflow'"),
        (["--mixed_precision", "fp8"], r"--mixed_precision must be one of no, fp16, bf16"),
        (["--resume_from_checkpoint", "no/such/folder"], r"must be 'latest' or an existing checkpoint folder"),
        (["--max_train_samples", "0"], r"--max_train_samples must be >= 1"),
        (["--max_eval_samples", "0", "--do_eval", "--train_val_split", "0.1"], r"--max_eval_samples must be >= 1"),
        (["--shuffle_buffer_size", "-1"], r"--shuffle_buffer_size must be >= 0, got -1\. 0 disables shuffling"),
        (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers must be >= 0"),
        (["--train_val_split", "1.0"], r"--train_val_split must be in \(0, 1\), got 1\.0"),
        (["--train_val_split", "0"], r"--train_val_split must be in \(0, 1\), got 0\.0"),
        (["--dataset_name", "some/data"], r"exactly one training source.*got --dataset_name, --train_dir"),
        (["--validation_split", "validation"], r"--validation_split 'validation' names a split of --dataset_name"),
        (
            ["--validation_dir", "val", "--train_val_split", "0.1"],
            r"at most one validation source.*got --validation_dir, --train_val_split",
        ),
    ],
)
def test_bad_values_fail_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags)


def test_no_training_source_is_an_error():
    with pytest.raises(ValueError, match="exactly one training source: --dataset_name, --train_dir or --data_files"):
        parse_arguments(CLASSES, ["--output_dir", "out"])


def test_defaults_and_subclass_paper_defaults_parse(tmp_path):
    @dataclass
    class PaperArguments(PretrainingArguments):
        warmup_steps: float = field(default=10 / 300)
        max_grad_norm: float | None = field(default=3.0)

    data_args, args = parse("--resume_from_checkpoint", str(tmp_path), classes=(DataArguments, PaperArguments))
    assert data_args.train_dir == "images" and data_args.validation_sources() == []
    assert args.warmup_steps == pytest.approx(10 / 300) and args.max_grad_norm == 3.0
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.min_learning_rate == 1e-5
    assert args.mixed_precision == "no" and not args.bf16 and not args.fp16
    assert args.report_to == "none" and args.token is None and args.model_revision == "main"


def test_yaml_and_json_files(tmp_path):
    settings = {"train_dir": "images", "output_dir": "out", "warmup_steps": 0.05, "bf16": True, "max_steps": 7}
    (tmp_path / "args.json").write_text(json.dumps(settings))
    (tmp_path / "args.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    for name in ("args.json", "args.yaml"):
        data_args, args = parse_arguments(CLASSES, [str(tmp_path / name)])
        assert data_args.train_dir == "images" and args.max_steps == 7
        assert args.warmup_steps == 0.05 and args.mixed_precision == "bf16"
    # YAML 1.1 reads 1e-4 (no dot) as a string: a clear error instead of a TypeError deep in the loop.
    (tmp_path / "bad.yaml").write_text("train_dir: images\noutput_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match=r"--learning_rate must be a number, got '1e-4'.*1\.0e-4"):
        parse_arguments(CLASSES, [str(tmp_path / "bad.yaml")])
    (tmp_path / "list.yaml").write_text("- --train_dir\n- images\n")
    with pytest.raises(ValueError, match="must hold a mapping of argument names to values, not list"):
        parse_arguments(CLASSES, [str(tmp_path / "list.yaml")])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation arguments


def test_do_eval_needs_a_validation_source():
    with pytest.raises(ValueError, match="--do_eval needs .*--validation_dir.*--validation_split.*--train_val_split"):
        parse("--do_eval")
    data_args, args = parse("--do_eval", "--validation_dir", "val", "--eval_steps", "50")
    assert args.do_eval and args.eval_steps == 50 and data_args.validation_sources() == ["--validation_dir"]
    data_args, _ = parse("--do_eval", "--train_val_split", "0.1", "--max_eval_samples", "100")
    assert data_args.train_val_split == 0.1 and data_args.max_eval_samples == 100
    data_args, _ = parse_arguments(
        CLASSES, ["--dataset_name", "d", "--validation_split", "validation", "--do_eval", "--output_dir", "o"]
    )
    assert data_args.validation_sources() == ["--validation_split"]


def test_eval_options_without_do_eval_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="pretraining.arguments"):
        parse("--validation_dir", "val", "--eval_steps", "10")
    assert "--validation_dir, --eval_steps given without --do_eval: no evaluation will run." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretraining.arguments"):
        parse()
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "no"),
        (["--bf16"], "bf16"),
        (["--fp16"], "fp16"),
        (["--mixed_precision", "bf16"], "bf16"),
        (["--mixed_precision", "fp16"], "fp16"),
        (["--mixed_precision", "no"], "no"),
        (["--bf16", "--mixed_precision", "bf16"], "bf16"),  # the same choice twice is not a conflict
    ],
)
def test_precision_flags(flags, expected):
    _, args = parse(*flags)
    assert args.mixed_precision == expected
    assert (args.bf16, args.fp16) == (expected == "bf16", expected == "fp16")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
        (["--bf16", "--mixed_precision", "no"], "--bf16 conflicts with --mixed_precision no"),
        (["--fp16", "--mixed_precision", "bf16"], "--fp16 conflicts with --mixed_precision bf16"),
    ],
)
def test_conflicting_precision_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags)


def test_precision_follows_accelerate_launch_unless_given(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse()[1].mixed_precision == "bf16"
    assert parse("--mixed_precision", "no")[1].mixed_precision == "no"
    assert parse("--fp16")[1].mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION='fp8'"):
        parse()


def test_default_image_size_is_the_processors_default():
    """--image_size unset builds a new model at DEFAULT_IMAGE_SIZE; the processors the scripts save with it must
    default to the same resolution, or a model saved without --image_size would read other-sized images."""
    import inspect

    from pretraining.arguments import DEFAULT_IMAGE_SIZE
    from processing import BeitV2ImageProcessor, VQKDImageProcessor

    for processor in (BeitV2ImageProcessor, VQKDImageProcessor):
        assert inspect.signature(processor.__init__).parameters["image_size"].default == DEFAULT_IMAGE_SIZE
