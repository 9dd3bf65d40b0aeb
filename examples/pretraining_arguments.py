"""Command-line arguments of the pretraining scripts (`run_vqkd.py`, `run_mim.py`, `run_pixel_decoder.py`), with
transformers' conventions.

The dataclasses are parsed by `HfArgumentParser` (or from a single ``.json`` / ``.yaml`` file) and check their values
in ``__post_init__``, so a bad value stops the run at parse time with the valid range rather than hours later. What
the loop derives from them lives next door: the peak lr, step counts, warmup and lr schedule in :mod:`schedules`, the
trackers and the Hub access checked before training in :mod:`startup_checks`.

Conventions follow `transformers.TrainingArguments`: ``--bf16`` / ``--fp16``, ``--warmup_steps`` as a step count or
a fraction of the training steps (below 1), ``--lr_scheduler_type`` with transformers' scheduler names,
``--report_to``, ``--token``, ``--trust_remote_code``, ``--model_revision``, ``--torch_compile``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from model_cards import LICENSE_HELP, check_hub_model_id, check_license

logger = logging.getLogger(__name__)

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb", "all")
# transformers' scheduler names that need nothing but the warmup and the step count (plus --min_learning_rate for
# the min-lr ones). Left out: reduce_lr_on_plateau and greedy (they need an eval metric at every step) and
# warmup_stable_decay (it needs the number of decay steps).
LR_SCHEDULER_CHOICES = (
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "cosine",
    "cosine_with_restarts",
    "linear",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
MIN_LR_SCHEDULERS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")
# Options removed from these scripts, with what replaces them. Only reported when no parsed dataclass defines the
# name again (a script may reuse one).
REMOVED_OPTIONS = {
    "warmup_ratio": "--warmup_steps takes a fraction of the training steps when below 1, e.g. --warmup_steps 0.05",
    "hub_token": "--token is used both to load from and to push to the Hub",
    "log_example_ids": "the audit of the examples each rank reads is a test helper of the data module now",
}


def check_range(
    name: str,
    value: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    note: str | None = None,
) -> None:
    """Raise a `ValueError` naming ``--name``, the valid range and the value when ``value`` is outside the range.

    For the ``__post_init__`` of argument dataclasses: ``check_range("drop_path_rate", 0.1, low=0, high=1,
    high_inclusive=False)``. ``None`` (an optional argument left unset) is accepted. NaN, booleans and strings (a
    YAML ``1e-4`` is a string) are rejected.

    Args:
        name (`str`): The argument's name, with or without the leading ``--``.
        value (`int`, `float` or `None`): The parsed value.
        low, high (`float`, *optional*): The bounds; ``None`` means unbounded on that side.
        low_inclusive, high_inclusive (`bool`): Whether each bound itself is valid.
        note (`str`, *optional*): Appended to the message, e.g. ``"0 disables saving"``.
    """
    if value is None:
        return
    flag = name if name.startswith("--") else f"--{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = (
            " (in YAML write a float with a dot, e.g. 1.0e-4; 1e-4 is read as a string)"
            if isinstance(value, str)
            else ""
        )
        raise ValueError(f"{flag} must be a number, got {value!r} of type {type(value).__name__}{hint}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if math.isnan(value) or too_low or too_high:
        message = f"{flag} must be {_describe_range(low, high, low_inclusive, high_inclusive)}, got {value!r}."
        raise ValueError(f"{message} {note}." if note else message)


def _describe_range(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high}"
    return "a number"


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a `ValueError` naming ``--name``, the valid choices and the value when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {value!r}.")


@dataclass
class DataArguments:
    """Where the training (and optional validation) images come from and how they are streamed."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. ILSVRC/imagenet-1k, timm/imagenet-1k-wds)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (imagefolder layout)."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local .parquet or webdataset .tar files (globs allowed)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "With --do_eval: a folder of validation images (imagefolder layout)."}
    )
    validation_split: str | None = field(
        default=None,
        metadata={"help": "With --do_eval: a split of --dataset_name to evaluate on (e.g. validation)."},
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "With --do_eval: hold out this fraction (in (0, 1)) of the training data for validation "
            "when the data has no validation split."
        },
    )
    streaming: bool = field(
        default=True, metadata={"help": "Stream the data (default). --streaming false prepares it locally first."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; defaults to the first Image feature."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many examples per epoch."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many examples."})
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Examples per shuffle window (per rank and worker); 0 disables."}
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader worker processes decoding images on each rank (0: decode in the main process). "
            "Local sources (--train_dir, --data_files, --streaming false) are split into enough shards for every "
            "worker; a Hub stream with fewer shards than ranks x workers runs fewer workers and logs it."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for downloaded datasets."})

    def __post_init__(self):
        sources = {"dataset_name": self.dataset_name, "train_dir": self.train_dir, "data_files": self.data_files}
        given = [f"--{name}" for name, value in sources.items() if value]
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one training source: --dataset_name, --train_dir or --data_files; got "
                f"{', '.join(given) if given else 'none'}."
            )
        validation_sources = self.validation_sources()
        if len(validation_sources) > 1:
            raise ValueError(
                f"Give at most one validation source (--validation_dir, --validation_split or --train_val_split); "
                f"got {', '.join(validation_sources)}."
            )
        if self.validation_split is not None and self.dataset_name is None:
            raise ValueError(
                f"--validation_split {self.validation_split!r} names a split of --dataset_name, but the training "
                "data is local; use --validation_dir or --train_val_split instead."
            )
        check_range("train_val_split", self.train_val_split, low=0, high=1, low_inclusive=False, high_inclusive=False)
        check_range("max_train_samples", self.max_train_samples, low=1)
        check_range("max_eval_samples", self.max_eval_samples, low=1)
        check_range("shuffle_buffer_size", self.shuffle_buffer_size, low=0, note="0 disables shuffling")
        check_range("dataloader_num_workers", self.dataloader_num_workers, low=0)

    def validation_sources(self) -> list[str]:
        """The validation options given, as flags (``["--validation_dir"]``); empty when none is."""
        sources = {
            "validation_dir": self.validation_dir,
            "validation_split": self.validation_split,
            "train_val_split": self.train_val_split,
        }
        return [f"--{name}" for name, value in sources.items() if value is not None]


@dataclass
class PretrainingArguments:
    """Optimisation, evaluation, checkpointing, logging and the Hub.

    Each script subclasses it to set the paper's defaults (a subclass with its own ``__post_init__`` must call
    ``super().__post_init__()``). After ``__post_init__``, ``mixed_precision`` is ``"no"``, ``"fp16"`` or ``"bf16"``
    and ``bf16`` / ``fp16`` agree with it.
    """

    output_dir: str = field(metadata={"help": "Checkpoints, metrics.jsonl, the final model and its card."})
    do_eval: bool = field(
        default=False,
        metadata={"help": "Evaluate on --validation_dir, --validation_split or a --train_val_split hold-out."},
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch per process and micro-step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Batch per process for evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak lr. Default: the paper's lr scaled linearly from its batch to the total batch."},
    )
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr",
        metadata={"help": f"transformers' scheduler name: {', '.join(LR_SCHEDULER_CHOICES)}."},
    )
    min_learning_rate: float = field(
        default=1e-5,
        metadata={"help": f"Final lr of the {' and '.join(MIN_LR_SCHEDULERS)} schedules (unused by the others)."},
    )
    warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Linear warmup: a whole number of optimizer steps (>= 1), or a fraction of the training steps "
            "when below 1 (e.g. 0.05)."
        },
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on 1-D parameters)."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.98)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm (None: off)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 trains for --num_train_epochs instead."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Epochs; needs a dataset of known size (else give --max_steps)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (same as --mixed_precision bf16)."})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision (same as --mixed_precision fp16)."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, fp16 or bf16. Default: --bf16/--fp16 if given, else Accelerate's setting "
            "(ACCELERATE_MIXED_PRECISION, set by `accelerate launch`), else no."
        },
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile()."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    seed: int = field(default=42)
    logging_steps: int = field(default=10, metadata={"help": "Log the averaged metrics every this many steps."})
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "With --do_eval: also evaluate every this many optimizer steps (unset: only at the end)."},
    )
    save_steps: int = field(default=1000, metadata={"help": "Save a checkpoint every this many steps (0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest checkpoint in --output_dir) or a checkpoint folder."}
    )
    max_consecutive_nonfinite: int = field(
        default=10,
        metadata={
            "help": "Stop (after saving) when this many optimizer steps in a row had a non-finite loss or gradient "
            "norm (their updates are skipped). Checked at logging steps."
        },
    )
    report_to: str = field(
        default="none", metadata={"help": "none, tensorboard, wandb or all (every installed one of them)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow Hub checkpoints (teacher, tokenizer, model) to run their own code. Review it first."},
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the Hub checkpoints to load."}
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token for loading gated models/datasets and for --push_to_hub (unset: the `hf auth login` token)."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final model; the token and the repo are checked before training."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo to push to (unset: the name of --output_dir, in your namespace)."}
    )
    license: str | None = field(default=None, metadata={"help": LICENSE_HELP})

    def __post_init__(self):
        # Checked now rather than when the model card is written, after the training.
        check_license(self.license)
        check_hub_model_id(self.hub_model_id)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, low=1)
        check_range("per_device_eval_batch_size", self.per_device_eval_batch_size, low=1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, low=1)
        check_range("learning_rate", self.learning_rate, low=0, low_inclusive=False)
        check_range("min_learning_rate", self.min_learning_rate, low=0)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULER_CHOICES)
        check_range("warmup_steps", self.warmup_steps, low=0)
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(
                f"--warmup_steps must be a whole number of steps (>= 1) or a fraction of the training steps "
                f"(below 1), got {self.warmup_steps!r}."
            )
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("adam_beta1", self.adam_beta1, low=0, high=1, high_inclusive=False)
        check_range("adam_beta2", self.adam_beta2, low=0, high=1, high_inclusive=False)
        check_range("adam_epsilon", self.adam_epsilon, low=0, low_inclusive=False)
        check_range(
            "max_grad_norm", self.max_grad_norm, low=0, low_inclusive=False, note="Leave it unset for no clipping"
        )
        if self.max_steps != -1:
            check_range("max_steps", self.max_steps, low=1, note="Use -1 to train for --num_train_epochs")
        check_range("num_train_epochs", self.num_train_epochs, low=0, low_inclusive=False)
        check_range("logging_steps", self.logging_steps, low=1)
        check_range("eval_steps", self.eval_steps, low=1)
        check_range("save_steps", self.save_steps, low=0, note="0 saves only at the end")
        check_range("save_total_limit", self.save_total_limit, low=1)
        check_range("max_consecutive_nonfinite", self.max_consecutive_nonfinite, low=1)
        check_choice("report_to", self.report_to, REPORT_TO_CHOICES)
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint must be 'latest' or an existing checkpoint folder; "
                f"{self.resume_from_checkpoint!r} is neither."
            )
        self.mixed_precision = self._resolve_mixed_precision()
        self.bf16 = self.mixed_precision == "bf16"
        self.fp16 = self.mixed_precision == "fp16"

    def _resolve_mixed_precision(self) -> str:
        """--bf16 / --fp16, else --mixed_precision, else Accelerate's environment, else "no"; conflicts raise."""
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other; pass one of them.")
        flag = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
            if flag is not None and self.mixed_precision != flag:
                raise ValueError(f"--{flag} conflicts with --mixed_precision {self.mixed_precision}; pass only one.")
            return self.mixed_precision
        if flag is not None:
            return flag
        # `accelerate launch --mixed_precision X` (or its config file) sets this; honouring it here keeps
        # `Accelerator(mixed_precision=...)` from silently overriding the launcher with "no".
        from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if from_launcher not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"ACCELERATE_MIXED_PRECISION={from_launcher!r} (from `accelerate launch` or its config) is not "
                f"supported by these scripts; use one of {', '.join(MIXED_PRECISION_CHOICES)}."
            )
        return from_launcher


def check_evaluation_arguments(data_args: DataArguments, args: PretrainingArguments) -> None:
    """Checks that span both dataclasses: ``--do_eval`` needs a validation source; eval options without it warn.

    :func:`parse_arguments` calls it; call it yourself when building the dataclasses in code.
    """
    sources = data_args.validation_sources()
    if args.do_eval and not sources:
        raise ValueError(
            "--do_eval needs validation data: give --validation_dir (a folder of images), --validation_split (a "
            "split of --dataset_name) or --train_val_split (a fraction of the training data held out)."
        )
    if not args.do_eval:
        unused = sources + [
            f"--{name}"
            for name, value in (("eval_steps", args.eval_steps), ("max_eval_samples", data_args.max_eval_samples))
            if value is not None
        ]
        if unused:
            logger.warning("%s given without --do_eval: no evaluation will run.", ", ".join(unused))


def parse_arguments(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse the command line, or a single ``.json`` / ``.yaml`` / ``.yml`` file given as the only argument.

    Each dataclass checks its own values; when both a :class:`DataArguments` and a :class:`PretrainingArguments`
    are parsed, :func:`check_evaluation_arguments` checks them together. An option these scripts removed (e.g.
    ``--warmup_ratio``) is an error that says what replaces it.

    Returns:
        One instance per class in ``dataclass_types``, in that order.
    """
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else list(args)
    defined = {item.name for dataclass_type in dataclass_types for item in fields(dataclass_type)}
    removed = {name: replacement for name, replacement in REMOVED_OPTIONS.items() if name not in defined}
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        path = Path(args[0]).absolute()
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            import yaml

            values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of argument names to values, not {type(values).__name__}.")
        _reject_removed(values, removed, f" in {path.name}")
        outputs = parser.parse_dict(values)
    else:
        given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in args if arg.startswith("--")}
        _reject_removed(given, removed, "")
        outputs = parser.parse_args_into_dataclasses(args=args)
    data_args = [output for output in outputs if isinstance(output, DataArguments)]
    training_args = [output for output in outputs if isinstance(output, PretrainingArguments)]
    if data_args and training_args:
        check_evaluation_arguments(data_args[0], training_args[0])
    return tuple(outputs)


def _reject_removed(names, removed: dict[str, str], where: str) -> None:
    for name in names:
        if name in removed:
            raise ValueError(f"--{name}{where} was removed: {removed[name]}.")
