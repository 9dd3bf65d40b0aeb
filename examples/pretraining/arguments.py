"""Command-line arguments of the pretraining scripts (`run_vqkd.py`, `run_mim.py`, `run_pixel_decoder.py`): the
dataclasses and their checks, the model configs built from flags, and the outside services checked before training.

The dataclasses check their values in ``__post_init__``, so a bad value stops the run at parse time with the valid
range rather than hours later. docs/pretraining.md describes the flags and how ``--config_name`` /
``--config_overrides`` become a validated config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from accelerate.utils import is_tensorboard_available, is_wandb_available
from transformers import AutoConfig, HfArgumentParser, PreTrainedConfig

from modeling_beitv2 import BeitV2Config, VQKDConfig
from pretraining.data import ImageSources
from pretraining.model_cards import LICENSE_HELP, check_hub_model_id, check_license

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
# The training settings a model card shows, besides the step count, total batch and peak learning rate.
CARD_SETTINGS = (
    "lr_scheduler_type", "min_learning_rate", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "max_grad_norm", "mixed_precision", "seed",
)  # fmt: skip
# The training resolution of a new model when --image_size is not given; the image processors' default too
# (tests/test_pretraining_arguments.py checks that they agree).
DEFAULT_IMAGE_SIZE = 224
FROZEN_MODEL_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# What --frozen_model_precision's "auto" means for each kind of frozen model (see resolve_frozen_model_precision).
_FROZEN_MODEL_HELP = {
    "teacher": "Autocast of the frozen teacher: fp32, fp16 or bf16. auto: the run's --bf16/--fp16 (its targets "
    "are continuous, and bf16 cannot overflow where large teachers overflow fp16), fp32 otherwise.",
    "tokenizer": "Autocast of the frozen tokenizer: fp32, fp16 or bf16. auto: fp16 under --bf16/--fp16 (its codes "
    "equal fp32's on 99.9%% of patches, bf16's on 98.5%%; see docs/pretraining.md), fp32 otherwise.",
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

    ``None`` (an optional argument left unset) is accepted; a ``None`` bound is no bound. NaN, booleans and strings
    (a YAML ``1e-4`` is a string) are rejected, and so are infinities (``--learning_rate inf``): no flag takes one.
    ``note`` is appended to the message, e.g. ``"0 disables saving"``.
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
    if not math.isfinite(value) or too_low or too_high:
        finite = "a finite number " if not math.isfinite(value) and not math.isnan(value) else ""
        message = f"{flag} must be {finite}{_describe_range(low, high, low_inclusive, high_inclusive)}, got {value!r}."
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


def frozen_model_precision_field(frozen_model: Literal["teacher", "tokenizer"]) -> Any:
    """The ``--frozen_model_precision`` field of a script's model arguments (the frozen model is a ``teacher`` in
    run_vqkd.py, a ``tokenizer`` in run_mim.py and run_pixel_decoder.py); check it with
    ``check_choice("frozen_model_precision", value, FROZEN_MODEL_PRECISIONS)``."""
    return field(default="auto", metadata={"help": _FROZEN_MODEL_HELP[frozen_model]})


def image_size_field() -> Any:
    """The ``--image_size`` field of run_vqkd.py and run_mim.py: unset means :data:`DEFAULT_IMAGE_SIZE` for a new
    model, the saved resolution with ``--model_name_or_path``. Check it with ``check_range("image_size", value,
    low=1)``."""
    help = f"Training resolution (default {DEFAULT_IMAGE_SIZE}, or the --model_name_or_path model's)."
    return field(default=None, metadata={"help": help})


def resolve_frozen_model_precision(
    requested: str, mixed_precision: str, frozen_model: Literal["teacher", "tokenizer"]
) -> str:
    """The autocast ("fp32", "fp16" or "bf16") of a frozen model for ``--frozen_model_precision`` (``requested``)
    under the run's ``mixed_precision``; an explicit choice wins over "auto".

    "auto" is fp32 without mixed precision. Under mixed precision it is fp16 for a tokenizer (its codes are discrete:
    fp16's longer mantissa keeps them closest to fp32's) and the run's precision for a teacher (its targets are
    continuous, and large teachers overflow fp16); docs/pretraining.md has the measurements.
    """
    check_choice("frozen_model_precision", requested, FROZEN_MODEL_PRECISIONS)
    if requested != "auto":
        return requested
    if mixed_precision == "no":
        return "fp32"
    return "fp16" if frozen_model == "tokenizer" else mixed_precision


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
        given = [f"--{name}" for name in ("dataset_name", "train_dir", "data_files") if getattr(self, name)]
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

    def sources(self) -> ImageSources:
        """Where :func:`pretraining.data.load_datasets` reads, as its settings object."""
        return ImageSources(**{item.name: getattr(self, item.name) for item in dataclasses.fields(ImageSources)})

    def training_data_identity(self) -> dict[str, Any]:
        """The flags that choose and order the training images, for the run identity: a resume never changes them
        (the data-loader state is checked too, but only once the output folder is prepared)."""
        names = (
            "dataset_name", "dataset_config_name", "train_dir", "data_files", "dataset_split", "image_column_name",
            "streaming", "train_val_split", "max_train_samples", "shuffle_buffer_size",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def validation_sources(self) -> list[str]:
        """The validation options given, as flags (``["--validation_dir"]``); empty when none is."""
        names = ("validation_dir", "validation_split", "train_val_split")
        return [f"--{name}" for name in names if getattr(self, name) is not None]


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
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip gradients to this norm (0 or None: off)."}
    )
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
    resume_allow_changes: bool = field(
        default=False,
        metadata={
            "help": "On resume, accept changed batch size, accumulation, mask settings, precision and the model's "
            "drop path / dropout / codebook EMA settings (logged and recorded in metrics.jsonl). The rest of the run "
            "identity (model architecture, tokenizer or teacher, data, seed) never changes."
        },
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
            "max_grad_norm",
            self.max_grad_norm,
            low=0,
            note="0 disables clipping (as in transformers' TrainingArguments)",
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

    def card_settings(self) -> dict[str, Any]:
        """The :data:`CARD_SETTINGS` of this run, for the model card's training table."""
        return {key: getattr(self, key) for key in CARD_SETTINGS}

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


def parse_arguments(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse the command line, or a single ``.json`` / ``.yaml`` / ``.yml`` file given as the only argument, into one
    instance per class in ``dataclass_types``, in that order.

    Each dataclass checks its own values; a :class:`DataArguments` and a :class:`PretrainingArguments` parsed together
    are checked together too: ``--do_eval`` needs a validation source, and eval options without it warn.
    """
    # transformers annotates dataclass_types with a NewType that no plain dataclass matches.
    parser = HfArgumentParser(dataclass_types)  # type: ignore[arg-type]
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        path = Path(args[0]).absolute()
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            import yaml

            values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of argument names to values, not {type(values).__name__}.")
        outputs = parser.parse_dict(values)
    else:
        outputs = parser.parse_args_into_dataclasses(args=args)
    data = next((output for output in outputs if isinstance(output, DataArguments)), None)
    training = next((output for output in outputs if isinstance(output, PretrainingArguments)), None)
    if data is not None and training is not None:
        validation_sources = data.validation_sources()
        if training.do_eval and not validation_sources:
            raise ValueError(
                "--do_eval needs validation data: give --validation_dir (a folder of images), --validation_split (a "
                "split of --dataset_name) or --train_val_split (a fraction of the training data held out)."
            )
        eval_options = {"--eval_steps": training.eval_steps, "--max_eval_samples": data.max_eval_samples}
        unused = validation_sources + [flag for flag, value in eval_options.items() if value is not None]
        if unused and not training.do_eval:
            logger.warning("%s given without --do_eval: no evaluation will run.", ", ".join(unused))
    return tuple(outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Model configs from the command line

# The keyword arguments of `from_pretrained` that --config_name passes through to the Hub.
HUB_KWARGS: tuple[str, ...] = ("revision", "token", "trust_remote_code")
# What may change on a pretrained model: regularisation and the codebook's training hyperparameters. None of them
# changes a parameter's shape or what the saved weights compute at inference.
PRETRAINED_SETTINGS: frozenset[str] = frozenset(
    {"drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "decay", "beta", "dead_code_threshold"}
)

# `to_dict()` keys that describe the file rather than the model (`model_type` is a class attribute), or that the
# config derives itself (`stage_names` from the depth of a backbone config).
_NOT_SETTABLE = frozenset({"transformers_version", "model_type", "_name_or_path", "auto_map", "stage_names"})
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_ConfigT = TypeVar("_ConfigT", bound=PreTrainedConfig)
_PresetConfigT = TypeVar("_PresetConfigT", BeitV2Config, VQKDConfig)  # the config classes with presets


def named_config(
    config_name: str,
    config_class: type[_PresetConfigT],
    presets: Mapping[str, Any],
    aliases: Mapping[str, str],
    hub_kwargs: Mapping[str, Any],
    preset_kwargs: Mapping[str, Any] | None = None,
) -> _PresetConfigT:
    """The config ``--config_name`` names: a preset (or alias) of `config_class`, built by its `from_preset` with
    `preset_kwargs`, else the `config_class` config that `AutoConfig` loads with `hub_kwargs` (see `HUB_KWARGS`).

    Raises:
        ValueError: an unknown name, a config of another model type, or an unsupported `hub_kwargs` key.
    """
    name = aliases.get(config_name, config_name)
    if name in presets:
        return config_class.from_preset(name, **(preset_kwargs or {}))
    choices = sorted(presets) + (sorted(aliases) if aliases else [])
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise ValueError(f"hub_kwargs {unknown} are not supported; choose from {list(HUB_KWARGS)}.")
    # `None` means "not given": from_pretrained then uses its own defaults.
    given = {key: value for key, value in hub_kwargs.items() if value is not None}
    try:
        loaded = AutoConfig.from_pretrained(config_name, **given)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--config_name {config_name!r} is neither a preset {choices} nor a config AutoConfig can load: {error}"
        ) from error
    if loaded.model_type != config_class.model_type:
        raise ValueError(
            f"--config_name {config_name!r} is a {loaded.model_type!r} config; this script needs a "
            f"{config_class.model_type!r} config or a preset {choices}."
        )
    if type(loaded) is config_class:
        return loaded
    # With trust_remote_code the Hub's copy of the class is loaded: rebuild it as this package's, so that its checks
    # run and the model classes here accept it.
    return config_class(**_constructor_kwargs(loaded))


def parse_config_overrides(text: str | None, config: PreTrainedConfig) -> dict[str, Any]:
    """Parse ``--config_overrides`` (``"key=value,key=value"``; `None` or blank gives `{}`) into values typed like
    `config`'s current attributes.

    Returns:
        `{key: value}`; for a config with sub-configs, the keys of a sub-config are gathered in a dict under the
        sub-config's attribute, e.g. `{"codebook_size": 64, "encoder_config": {"hidden_size": 32}}`. A prefixed key
        (`decoder.hidden_size`) wins over the same key sent to all sub-configs (`hidden_size`).

    Raises:
        ValueError: a malformed or repeated item, a key `config` does not have (naming the closest valid ones), a
            value that does not parse as the attribute's type, or an attribute that is not a bool, int, float or str.
    """
    sub_configs = _sub_configs(config)
    top_keys = _settable_keys(config) - set(sub_configs)
    shared_keys = set.intersection(*(_settable_keys(sub) for sub in sub_configs.values())) if sub_configs else set()
    parsed: dict[str, Any] = {}
    specific: dict[str, dict[str, Any]] = {}  # prefixed keys, merged last so that they win
    for key, raw in _split_items(text):
        prefix, dot, rest = key.partition(".")
        if dot and f"{prefix}_config" in sub_configs:
            sub = sub_configs[f"{prefix}_config"]
            if rest not in _settable_keys(sub):
                raise _unknown_key_error(key, sorted(_override_keys(sub, f"{prefix}.")), config)
            specific.setdefault(f"{prefix}_config", {})[rest] = _typed_value(key, raw, sub, rest)
        elif key in top_keys:
            parsed[key] = _typed_value(key, raw, config, key)
        elif key in shared_keys:
            for name, sub in sub_configs.items():
                parsed.setdefault(name, {})[key] = _typed_value(key, raw, sub, key)
        else:
            raise _unknown_key_error(key, sorted(shared_keys.union(_override_keys(config))), config)
    for name, values in specific.items():
        parsed[name] = {**parsed.get(name, {}), **values}
    return parsed


def merge_fixed(parsed: Mapping[str, Any], fixed: Mapping[str, Any], scope: str = "") -> dict[str, Any]:
    """`parsed` overrides plus the settings other arguments decide (`fixed`: `{key: (value, source)}`, nested like
    `parsed` for sub-configs); an override that contradicts one of them is refused, naming its `source`."""
    merged = dict(parsed)
    for key, spec in fixed.items():
        if isinstance(spec, Mapping):
            merged[key] = merge_fixed(parsed.get(key, {}), spec, scope=f"{scope}{key.removesuffix('_config')}.")
            continue
        value, source = spec
        if key in parsed and parsed[key] != value:
            raise ValueError(
                f"--config_overrides sets {scope}{key}={parsed[key]!r}, but {source} decides it ({value!r}); "
                f"leave {scope}{key} out of --config_overrides."
            )
        merged[key] = value
    return merged


def rebuild_config(config: _ConfigT, updates: Mapping[str, Any]) -> _ConfigT:
    """A new `type(config)` from `config`'s values with `updates` on top (sub-config dicts merged key by key), built
    through its constructor so that its checks run."""
    kwargs = _constructor_kwargs(config)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(getattr(config, key, None), PreTrainedConfig):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    return type(config)(**kwargs)


def square_side(size: int | list[int] | tuple[int, int]) -> int:
    """The side of a BEiT config's square `image_size` or `patch_size`, which transformers' `BeitConfig` lets be an
    int or a pair (`BeitV2Config` checks that a pair is square)."""
    return size if isinstance(size, int) else size[0]


def pretrained_config_updates(
    config: PreTrainedConfig, *, image_size: int | None, drop_path_rate: float | None, overrides: str | None
) -> dict[str, Any]:
    """What to pass to `from_pretrained(name, **updates)` to honour `--image_size`, `--drop_path_rate` and
    `--config_overrides` with `--model_name_or_path`: `{}` when nothing changes, else `{"config": new_config}`.

    Only `PRETRAINED_SETTINGS` can change: they leave the architecture alone. `image_size` may only repeat the saved
    resolution. `drop_path_rate` goes to every sub-config that has one (both ViTs of a VQ-KD tokenizer).

    Raises:
        ValueError: an unknown or malformed override, or a change to anything but `PRETRAINED_SETTINGS`, naming the
            keys.
    """
    updates = parse_config_overrides(overrides, config)
    if drop_path_rate is not None:
        updates = merge_fixed(
            updates, _wherever(config, "drop_path_rate", (float(drop_path_rate), "--drop_path_rate"))
        )
    if image_size is not None:
        # A tokenizer's resolution is its encoder's (the decoder's image_size is the grid of codes).
        saved = getattr(config, "encoder_config", config).image_size
        if (image_size, image_size) != (tuple(saved) if isinstance(saved, (list, tuple)) else (saved, saved)):
            raise ValueError(
                f"--image_size {image_size} differs from the pretrained model's image_size {saved}: its position "
                "embeddings / bias tables are sized for it. Leave --image_size out or set it to the saved one "
                "(the fine-tuning scripts resize them), or start a new model from --config_name."
            )
    changes = _changes(config, updates)
    refused = sorted(key for key in _flat_keys(changes) if key.rpartition(".")[2] not in PRETRAINED_SETTINGS)
    if refused:
        allowed = sorted(key for key in _override_keys(config) if key.rpartition(".")[2] in PRETRAINED_SETTINGS)
        raise ValueError(
            f"--config_overrides cannot change {refused} of a pretrained {type(config).__name__}: they change the "
            f"architecture or what the saved weights mean. With --model_name_or_path only {allowed} can change; "
            "start from --config_name to build a different model."
        )
    return {"config": rebuild_config(config, changes)} if changes else {}


def _split_items(text: str | None) -> list[tuple[str, str]]:
    if text is None or not text.strip():
        return []
    items: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--config_overrides items must look like key=value, got {item.strip()!r} in {text!r}.")
        if any(key == seen for seen, _ in items):
            raise ValueError(f"--config_overrides sets {key} twice in {text!r}.")
        items.append((key, value))
    return items


def _settable_keys(config: PreTrainedConfig) -> set[str]:
    return set(config.to_dict()) - _NOT_SETTABLE


def _sub_configs(config: PreTrainedConfig) -> dict[str, PreTrainedConfig]:
    return {
        key: getattr(config, key)
        for key in config.to_dict()
        if isinstance(getattr(config, key, None), PreTrainedConfig)
    }


def _override_keys(config: PreTrainedConfig, prefix: str = "") -> list[str]:
    """Every key of `config` as --config_overrides spells it: a sub-config's keys prefixed (`encoder.hidden_size`)."""
    sub_configs = _sub_configs(config)
    keys = [prefix + key for key in _settable_keys(config) - set(sub_configs)]
    for name, sub in sub_configs.items():
        keys += _override_keys(sub, f"{prefix}{name.removesuffix('_config')}.")
    return keys


def _flat_keys(nested: Mapping[str, Any]) -> list[str]:
    """`{"a": 1, "encoder_config": {"b": 2}}` -> `["a", "encoder.b"]`, the way --config_overrides spells them."""
    keys: list[str] = []
    for key, value in nested.items():
        if isinstance(value, Mapping):
            keys.extend(f"{key.removesuffix('_config')}.{name}" for name in _flat_keys(value))
        else:
            keys.append(key)
    return keys


def _typed_value(spelled: str, raw: str, config: PreTrainedConfig, key: str) -> Any:
    """`raw` as the type of `config.<key>`'s current value (`spelled` is the key as the user wrote it)."""
    current = getattr(config, key)
    if isinstance(current, bool):  # before int: a bool is an int
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise _bad_value(spelled, raw, current, "true/false/1/0")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            # A field annotated `float | int` may hold an int now (e.g. a drop path rate of 0) and take a float.
            annotations = {item.name: str(item.type) for item in dataclasses.fields(config)}
            if "float" not in annotations.get(key, ""):
                raise _bad_value(spelled, raw, current, "an int") from None
    if isinstance(current, (int, float)):
        try:
            return float(raw)
        except ValueError:
            raise _bad_value(spelled, raw, current, "a float") from None
    if isinstance(current, str):
        return raw
    raise ValueError(
        f"--config_overrides cannot set {spelled}: only bool, int, float and str attributes can be set this way, "
        f"and it is {current!r}."
    )


def _bad_value(spelled: str, raw: str, current: Any, expected: str) -> ValueError:
    return ValueError(f"--config_overrides: {spelled} takes {expected} (it is {current!r} now), got {raw!r}.")


def _unknown_key_error(key: str, valid: list[str], config: PreTrainedConfig) -> ValueError:
    closest = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(closest)}?" if closest else f"valid keys are {valid}."
    return ValueError(f"--config_overrides: {type(config).__name__} has no {key!r}; {hint}")


def _constructor_kwargs(config: PreTrainedConfig) -> dict[str, Any]:
    """Keyword arguments that rebuild `config` through its constructor."""
    kwargs = {key: value for key, value in config.to_dict().items() if key not in _NOT_SETTABLE - {"_name_or_path"}}
    if getattr(config, "stage_names", None) is not None:
        # A backbone config derives out_features / out_indices from its depth when they are not given: pass them on
        # only when they were chosen, so that a new num_hidden_layers gets its own default instead of a stale one.
        kwargs.pop("out_features", None)
        if list(config.out_indices) == [len(config.stage_names) - 1]:
            kwargs.pop("out_indices", None)
    for key, value in kwargs.items():
        if isinstance(getattr(config, key, None), PreTrainedConfig):
            kwargs[key] = _constructor_kwargs(getattr(config, key)) if value is not None else value
    return kwargs


def _wherever(config: PreTrainedConfig, key: str, spec: tuple[Any, str]) -> dict[str, Any]:
    """`{key: spec}` for `config`, or for each of its sub-configs that has `key` when it has none itself."""
    sub_configs = _sub_configs(config)
    if key in _settable_keys(config) - set(sub_configs):
        return {key: spec}
    scoped = {name: {key: spec} for name, sub in sub_configs.items() if key in _settable_keys(sub)}
    if not scoped:
        raise ValueError(f"{type(config).__name__} has no {key}.")
    return scoped


def _changes(config: PreTrainedConfig, updates: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `updates` that differ from `config`'s current values (sub-configs compared key by key)."""
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        current = getattr(config, key)
        if isinstance(value, Mapping) and isinstance(current, PreTrainedConfig):
            if nested := _changes(current, value):
                changes[key] = nested
        elif value != current:
            changes[key] = value
    return changes


# ---------------------------------------------------------------------------------------------------------------------
# Trackers and the Hub, checked before training

TRACKERS = ("tensorboard", "wandb")  # what `--report_to all` may select
TRACKER_INSTALL_COMMANDS = {
    "tensorboard": 'pip install -e ".[tensorboard]" (this project\'s extra) or pip install tensorboard',
    "wandb": "pip install wandb",
}


def check_report_to(report_to: str) -> list[str] | None:
    """The trackers for ``Accelerator(log_with=...)``: None for ``"none"``, else the backends' names.

    Raises:
        ValueError: at start, when a requested backend (or, for ``"all"``, every backend) is not installed, rather
            than a run that logs nothing.
    """
    check_choice("report_to", report_to, REPORT_TO_CHOICES)
    if report_to == "none":
        return None
    installed = [name for name in TRACKERS if _tracker_installed(name)]
    if report_to == "all":
        if not installed:
            raise ValueError(
                f"--report_to all found no tracker installed ({', '.join(TRACKERS)}): "
                f"{TRACKER_INSTALL_COMMANDS['tensorboard']} (or pip install wandb), or pass --report_to none."
            )
        return installed
    if report_to not in installed:
        raise ValueError(
            f"--report_to {report_to} needs the {report_to} package: {TRACKER_INSTALL_COMMANDS[report_to]}, or pass "
            "--report_to none."
        )
    return [report_to]


def _tracker_installed(name: str) -> bool:
    # Looked up at call time, so tests can patch the checks on this module.
    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def _hub_network_errors() -> tuple[type[BaseException], ...]:
    """The errors of a failed Hub call: huggingface_hub's (all OSError) and the HTTP client's transport errors."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(client).HTTPError)
    return tuple(errors)


def check_hub_access(push_to_hub: bool, hub_model_id: str | None, output_dir: str, token: str | None) -> str | None:
    """With ``push_to_hub``, check the token and create the repo ``hub_model_id`` (else the name of ``output_dir``, in
    the token's namespace) or find it now, before hours of training; return its full id (None without push_to_hub).

    Exits with a one-line message (no traceback) when there is no token, the token is invalid or read-only, the repo
    cannot be created or written, or the Hub cannot be reached (e.g. ``HF_HUB_OFFLINE``). Safe to call on every rank.
    """
    if not push_to_hub:
        return None
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError

    repo_id = hub_model_id or Path(output_dir).absolute().name
    api = huggingface_hub.HfApi(token=token)
    try:
        identity = api.whoami()
        role = identity.get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise SystemExit(
                f"--push_to_hub: the token of {identity.get('name', 'this user')} is read-only; pass a token with "
                "write access (--token or `hf auth login`)."
            )
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    except LocalTokenNotFoundError:
        raise SystemExit(
            "--push_to_hub needs a Hub token with write access: pass --token or run `hf auth login`."
        ) from None
    except HFValidationError as error:
        raise SystemExit(f"--push_to_hub: {repo_id!r} is not a valid repo id ({_first_line(error)}).") from None
    except _hub_network_errors() as error:
        raise SystemExit(
            f"--push_to_hub: cannot use the Hub repo {repo_id!r} ({type(error).__name__}: {_first_line(error)}). "
            "Check the token and the network, or drop --push_to_hub."
        ) from None
    logger.info("Will push the final model to %s/%s", huggingface_hub.constants.ENDPOINT, repo_id)
    return repo_id


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no details"
