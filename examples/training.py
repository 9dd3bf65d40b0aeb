"""Accelerate training-loop pieces shared by `run_vqkd.py` and `run_mim.py`.

Argument dataclasses, learning-rate scaling and the schedule, atomic checkpoints with rotation and exact resume,
SIGTERM/SIGINT handling, non-finite-loss handling, and logging to stdout, ``metrics.jsonl`` and trackers. The
scripts only build their models and data and give :func:`train` a function that computes one step's loss.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from image_datasets import ImageStream, StreamStateTracker, build_dataloader, load_image_stream
from param_groups import apply_lr_scale, build_param_groups
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_with_min_lr_schedule_with_warmup
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state_rank{rank}.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class DataArguments:
    """Where the training images come from and how they are streamed."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. ILSVRC/imagenet-1k, timm/imagenet-1k-wds)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (imagefolder layout)."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local .parquet or webdataset .tar files (globs allowed)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(
        default=True, metadata={"help": "Stream the data (default). --streaming false prepares it locally first."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; defaults to the first Image feature."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many examples per epoch."})
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Examples per shuffle window (per rank and worker); 0 disables."}
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader worker processes decoding images. 0 (default) resumes bit-exactly; with workers "
            "each worker resumes at its own position but batch interleaving after a resume may differ."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for downloaded datasets."})


@dataclass
class PretrainingArguments:
    """Optimisation, checkpointing and logging; each script subclasses it to set the paper's defaults."""

    output_dir: str = field(metadata={"help": "Checkpoints, metrics.jsonl, the final model and its card."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch per process and micro-step."})
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak lr. Default: the paper's lr scaled linearly from its batch to the total batch."},
    )
    min_learning_rate: float = field(default=1e-5, metadata={"help": "Final lr of the cosine schedule."})
    weight_decay: float = field(default=0.05)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.98)
    adam_epsilon: float = field(default=1e-8)
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num_train_epochs if > 0."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Epochs; needs a dataset of known size (else give --max_steps)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps; overrides --warmup_ratio if > 0."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of the training steps."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm (None: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    gradient_checkpointing: bool = field(default=False)
    seed: int = field(default=42)
    logging_steps: int = field(default=10)
    save_steps: int = field(default=1000, metadata={"help": "Save a checkpoint every this many steps (0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest checkpoint in --output_dir) or a checkpoint folder."}
    )
    max_consecutive_nonfinite: int = field(
        default=10, metadata={"help": "Stop (after saving) when this many steps in a row had a non-finite loss."}
    )
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb or all."})
    log_example_ids: bool = field(
        default=False,
        metadata={"help": "Write the id of every example each rank trains on to example_ids_rank{N}.txt (audit)."},
    )
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None)
    hub_token: str | None = field(default=None)


def parse_arguments(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse the command line, or a single ``.json`` / ``.yaml`` / ``.yml`` file given as the only argument."""
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else args
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """``"hidden_size=32,num_hidden_layers=2,use_patch_aggregation=false"`` -> a dict of typed values."""
    if not overrides:
        return {}
    parsed = {}
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides items must look like key=value, got {item!r} in {overrides!r}.")
        parsed[key.strip()] = _parse_value(value.strip())
    return parsed


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def build_accelerator(args: PretrainingArguments) -> Accelerator:
    """An Accelerator with loggers, then the world size logged so that a run that silently trains alone shows."""
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=args.output_dir,
    )
    logging.basicConfig(
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
        force=True,
    )
    # Printed by every rank: two ranks that each report world size 1 means the launch did not distribute.
    print(
        f"[rank {accelerator.process_index}] world size {accelerator.num_processes}, "
        f"distributed type {accelerator.distributed_type.value}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}",
        flush=True,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        # Filled here because the DataLoader is not prepared (it is already sharded per rank), so Accelerate
        # cannot infer them; an explicit value in the JSON wins over the arguments.
        settings = {
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_clipping": args.max_grad_norm or 0.0,
        }
        for key, value in settings.items():
            if plugin.deepspeed_config.get(key, "auto") == "auto":
                plugin.deepspeed_config[key] = value
    set_seed(args.seed)
    return accelerator


@contextlib.contextmanager
def outside_zero3(accelerator: Accelerator):
    """Context for loading a frozen model (teacher, tokenizer) that is never passed to ``prepare()``.

    Under ZeRO-3, transformers' ``from_pretrained`` partitions weights across ranks whenever a ZeRO-3 config is
    active (whatever ``zero3_init_flag`` says), and a module DeepSpeed does not manage never gathers them back.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def total_batch_size(args: PretrainingArguments, num_processes: int) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes


def resolve_learning_rate(args: PretrainingArguments, num_processes: int, paper_lr: float, paper_batch: int) -> float:
    """``--learning_rate``, or the paper's peak lr scaled linearly from its batch size to ours."""
    if args.learning_rate is not None:
        return args.learning_rate
    return paper_lr * total_batch_size(args, num_processes) / paper_batch


def resolve_training_steps(args: PretrainingArguments, num_examples: int | None, num_processes: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    if num_examples is None:
        raise ValueError(
            "The number of training examples is unknown for this stream, so --num_train_epochs "
            f"{args.num_train_epochs} cannot be turned into steps; give --max_steps."
        )
    steps_per_epoch = max(1, num_examples // total_batch_size(args, num_processes))
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def build_optimizer_and_scheduler(
    model: torch.nn.Module,
    args: PretrainingArguments,
    learning_rate: float,
    num_training_steps: int,
    no_weight_decay_names: tuple[str, ...] = ("cls_token", "position_embeddings"),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the reference's no-weight-decay groups; per-step linear warmup then cosine to the minimum lr."""
    groups = build_param_groups(model, args.weight_decay, no_weight_decay_names=no_weight_decay_names)
    groups = [{key: value for key, value in group.items() if key != "names"} for group in apply_lr_scale(groups, 1.0)]
    for group in groups:
        group["lr"] = learning_rate
    optimizer = torch.optim.AdamW(
        groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * num_training_steps)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, num_training_steps, min_lr=min(args.min_learning_rate, learning_rate)
    )
    return optimizer, scheduler


def stream_size(dataset, data_args: DataArguments) -> int | None:
    """Examples per epoch when the dataset's metadata knows it (capped by --max_train_samples), else None."""
    splits = getattr(dataset.info, "splits", None) or {}
    split = splits.get(data_args.dataset_split)
    known = split.num_examples if split is not None and split.num_examples else None
    if data_args.max_train_samples is not None:
        return data_args.max_train_samples if known is None else min(known, data_args.max_train_samples)
    return known


@dataclass
class PretrainingSetup:
    """What :func:`setup_pretraining` builds for :func:`train`."""

    # model, optimizer, scheduler and dataloader are None after `end_training`.
    model: torch.nn.Module | None  # as returned by ``accelerator.prepare``
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    stream: ImageStream
    dataloader: torch.utils.data.DataLoader | None
    learning_rate: float
    num_training_steps: int


def setup_pretraining(
    accelerator: Accelerator,
    model: torch.nn.Module,
    data_args: DataArguments,
    args: PretrainingArguments,
    transform: Callable[[PIL.Image.Image, np.random.Generator], dict[str, Any]],
    paper_learning_rate: float,
    paper_batch_size: int,
) -> PretrainingSetup:
    """This rank's image stream through ``transform`` and its DataLoader, the peak lr and step count, and AdamW with
    its schedule, with the model and optimizer passed through ``accelerator.prepare``.

    ``transform(image, rng)`` is :class:`ImageStream`'s; the peak lr is ``--learning_rate`` or the paper's
    ``paper_learning_rate`` at ``paper_batch_size`` scaled linearly to the total batch.
    """
    dataset, image_column = load_image_stream(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_dir,
        data_args.data_files,
        split=data_args.dataset_split,
        image_column_name=data_args.image_column_name,
        streaming=data_args.streaming,
        cache_dir=data_args.cache_dir,
    )
    num_examples = stream_size(dataset, data_args)
    stream = ImageStream(
        dataset,
        image_column,
        transform,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        max_samples=data_args.max_train_samples,
        with_ids=args.log_example_ids,
    )
    dataloader = build_dataloader(
        stream,
        args.per_device_train_batch_size,
        data_args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    learning_rate = resolve_learning_rate(args, accelerator.num_processes, paper_learning_rate, paper_batch_size)
    num_training_steps = resolve_training_steps(args, num_examples, accelerator.num_processes)
    optimizer, scheduler = build_optimizer_and_scheduler(model, args, learning_rate, num_training_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return PretrainingSetup(model, optimizer, scheduler, stream, dataloader, learning_rate, num_training_steps)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked once per step, so that the loop saves a checkpoint and exits."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders of interrupted saves are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name)]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE.format(rank=0)).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder.")
    return path


def save_checkpoint(accelerator: Accelerator, args: PretrainingArguments, step: int, training_state: dict) -> Path:
    """Save model/optimizer/scheduler/RNG (Accelerate) and this rank's training state, atomically.

    Everything is written into ``.tmp-checkpoint-{step}`` and renamed to ``checkpoint-{step}`` once every rank has
    finished, so a run killed mid-save never leaves a checkpoint that looks complete. Needs a file system shared
    by all ranks (as multi-node checkpointing always does).
    """
    output_dir = Path(args.output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    state_file = temporary / TRAINING_STATE_FILE.format(rank=accelerator.process_index)
    state_file.write_text(json.dumps(training_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if args.save_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -max(1, args.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def read_training_state(accelerator: Accelerator, path: Path) -> dict:
    """This rank's loop counters and stream position saved in a checkpoint."""
    state_file = path / TRAINING_STATE_FILE.format(rank=accelerator.process_index)
    if not state_file.is_file():
        raise ValueError(
            f"{state_file} is missing: the checkpoint was written by fewer processes than the "
            f"{accelerator.num_processes} running now; resume with the same number of processes."
        )
    saved = json.loads(state_file.read_text())
    written_by = saved["loop"].get("num_processes", accelerator.num_processes)
    if written_by != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {written_by} processes but {accelerator.num_processes} are running: the data "
            "streams, RNG states and total batch size belong to that process count; resume with the same number."
        )
    return saved


def _drop_metrics_after(metrics_file: Path, step: int) -> None:
    """Remove records of steps after `step` (logged by the interrupted run after its last checkpoint)."""
    if not metrics_file.exists():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if record["step"] <= step:
            kept.append(line)
    metrics_file.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """Averages step metrics over ``logging_steps`` and writes them to stdout, ``metrics.jsonl`` and trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.sums: dict[str, float] = {}
        self.count = 0

    def accumulate(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def write(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step}
        record.update({key: value / max(1, self.count) for key, value in self.sums.items()})
        record.update(extra)
        self.sums, self.count = {}, 0
        if self.accelerator.is_main_process:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
            logger.info("step %d: %s", step, _format_record(record))
        self.accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
        return record


def _format_record(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in record.items()
        if key != "step"
    )


# ---------------------------------------------------------------------------------------------------------------
# The loop


StepFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train(
    accelerator: Accelerator,
    args: PretrainingArguments,
    setup: PretrainingSetup,
    step_function: StepFunction,
    tracker_config: dict[str, Any] | None = None,
    project_name: str = "beitv2",
) -> dict[str, Any]:
    """Run the optimisation: gradient accumulation, clipping, logging, checkpoints, resume, signals.

    ``setup`` comes from :func:`setup_pretraining`; its scheduler is NOT prepared (it is stepped once per optimizer
    step here and registered for checkpointing). ``step_function(model, batch)`` gets the prepared model and returns
    the loss and a dict of scalar metrics for one micro-batch (already on the device). The trackers get
    ``tracker_config`` plus the peak lr and the step count.

    A non-finite loss on any rank skips backward for that micro-batch and discards the current accumulation cycle
    (no parameter update, the schedule still advances). After ``max_consecutive_nonfinite`` such steps in a row the
    run saves a checkpoint and stops with an error.

    Returns:
        The final training state: ``step``, counters, ``stopped_early`` and ``last_metrics`` (the last record
        written to ``metrics.jsonl``).
    """
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    stream, dataloader, num_training_steps = setup.stream, setup.dataloader, setup.num_training_steps
    accelerator.register_for_checkpointing(scheduler)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # by every rank: each writes its own files
    tracker = StreamStateTracker()
    # The process count is part of the state: each rank resumes its own stream position and RNG.
    state = {
        "step": 0,
        "num_nonfinite_steps": 0,
        "consecutive_nonfinite": 0,
        "num_processes": accelerator.num_processes,
    }
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None and (earlier_checkpoints := list_checkpoints(args.output_dir)):
        # Rotation and `latest` go by step number, so a fresh run here would delete its own checkpoints and a
        # later `latest` would resume the old run.
        raise ValueError(
            f"{args.output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier_checkpoints)})"
            ": pass --resume_from_checkpoint latest to continue it, or use another --output_dir (or delete them)."
        )
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes the folder
    if accelerator.is_main_process:
        for interrupted in Path(args.output_dir).glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(interrupted, ignore_errors=True)
    if checkpoint is not None:
        saved = read_training_state(accelerator, checkpoint)
        state.update(saved["loop"])
        tracker.load_state_dict(saved["stream"])
        stream.load_state_dict(tracker.worker_states)
        if accelerator.is_main_process:
            _drop_metrics_after(Path(args.output_dir) / METRICS_FILE, state["step"])
    elif accelerator.is_main_process and (Path(args.output_dir) / METRICS_FILE).exists():
        # A fresh run in a used folder starts a fresh metrics file; a resumed run appends to it.
        (Path(args.output_dir) / METRICS_FILE).unlink()
    if args.report_to != "none":
        run_config = {"learning_rate": setup.learning_rate, "steps": num_training_steps}
        accelerator.init_trackers(project_name, config={**(tracker_config or {}), **run_config})
    ids_file = None
    if args.log_example_ids:
        ids_path = Path(args.output_dir) / f"example_ids_rank{accelerator.process_index}.txt"
        ids_file = ids_path.open("a" if checkpoint is not None else "w")

    stop = StopSignal()
    metrics_logger = MetricsLogger(accelerator, args.output_dir)
    progress = tqdm(
        total=num_training_steps,
        initial=state["step"],
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    images_per_log, log_started = 0, time.perf_counter()
    cycle_is_bad = False
    stop_reason: str | None = None
    last_metrics: dict[str, Any] = {}
    # Starting a DataLoader iterator draws from the torch RNG, so it happens before the saved RNG states are
    # restored: a resumed run then continues the uninterrupted run's random stream (drop path) exactly.
    batches = iter(dataloader)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("Resumed from %s at step %d", checkpoint, state["step"])
    model.train()
    while state["step"] < num_training_steps and stop_reason is None:
        batch = next(batches)
        tracker.update(batch)
        example_ids = batch.pop("example_ids", None)
        if ids_file is not None:
            ids_file.write("".join(f"{identifier}\n" for identifier in example_ids))
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        with accelerator.accumulate(model):
            loss, step_metrics = step_function(model, batch)
            # One all-reduce carries both flags so every rank takes the same branch (no DDP deadlock).
            flags = torch.tensor(
                [float(not torch.isfinite(loss.detach()).item()), float(stop.received is not None)],
                device=accelerator.device,
            )
            flags = accelerator.reduce(flags, reduction="sum")
            loss_is_bad, stop_requested = bool(flags[0] > 0), bool(flags[1] > 0)
            if loss_is_bad:
                cycle_is_bad = True
            else:
                accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and not cycle_is_bad:
                if args.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images_per_log += batch[next(iter(batch))].shape[0] * accelerator.num_processes
        if not loss_is_bad:
            metrics = {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in step_metrics.items()}}
            metrics = {key: value.item() for key, value in accelerator.reduce(metrics, reduction="mean").items()}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics_logger.accumulate(metrics)
        if not accelerator.sync_gradients:
            continue  # a stop request is acted on at the end of the accumulation cycle

        # One optimizer step (or one discarded cycle) is complete.
        state["step"] += 1
        scheduler.step()
        progress.update(1)
        if cycle_is_bad:
            state["num_nonfinite_steps"] += 1
            state["consecutive_nonfinite"] += 1
            logger.warning(
                "Non-finite loss at step %d: update skipped (%d in a row).",
                state["step"],
                state["consecutive_nonfinite"],
            )
        else:
            state["consecutive_nonfinite"] = 0
        cycle_is_bad = False
        if state["consecutive_nonfinite"] >= args.max_consecutive_nonfinite:
            stop_reason = "nonfinite"
        elif stop_requested:
            stop_reason = "signal"

        if state["step"] % args.logging_steps == 0 or state["step"] == num_training_steps:
            elapsed = time.perf_counter() - log_started
            last_metrics = metrics_logger.write(
                state["step"],
                {
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_second": images_per_log / max(elapsed, 1e-9),
                    "num_bad_images": _sum_over_ranks(accelerator, tracker.num_bad_images),
                    "num_converted_images": _sum_over_ranks(accelerator, tracker.num_converted_images),
                    "num_nonfinite_steps": state["num_nonfinite_steps"],
                },
            )
            images_per_log, log_started = 0, time.perf_counter()
        periodic_save = args.save_steps > 0 and state["step"] % args.save_steps == 0
        if periodic_save or stop_reason is not None or state["step"] == num_training_steps:
            save_checkpoint(accelerator, args, state["step"], {"loop": state, "stream": tracker.state_dict()})

    progress.close()
    stop.restore()
    if ids_file is not None:
        ids_file.close()
    if tracker.num_bad_images or tracker.num_converted_images:
        logger.warning(
            "This rank skipped %d unusable images (each logged with its reason) and converted %d to RGB.",
            tracker.num_bad_images,
            tracker.num_converted_images,
        )
    if stop_reason == "nonfinite":
        del model  # end_training below needs the wrapped model gone
        end_training(accelerator, setup)
        raise RuntimeError(
            f"Stopped: {state['consecutive_nonfinite']} consecutive steps had a non-finite loss (last at step "
            f"{state['step']}). A checkpoint was saved in {args.output_dir}; lower the learning rate, enable "
            "--max_grad_norm or switch fp16 to bf16, then --resume_from_checkpoint latest."
        )
    if stop_reason == "signal":
        logger.warning("Stopped by %s at step %d after saving a checkpoint.", stop.received or "signal", state["step"])
    return {**state, "stopped_early": stop_reason is not None, "last_metrics": last_metrics}


def _sum_over_ranks(accelerator: Accelerator, value: int) -> int:
    tensor = torch.tensor([value], device=accelerator.device, dtype=torch.long)
    return int(accelerator.reduce(tensor, reduction="sum").item())


def finish_training(
    accelerator: Accelerator,
    args: PretrainingArguments,
    data_args: DataArguments,
    setup: PretrainingSetup,
    state: dict[str, Any],
    image_processor,
    card_kind: str,
    card_fields: dict[str, Any],
) -> None:
    """``save_pretrained`` of the model and its image processor, a model card, and the optional Hub upload.

    ``state`` is what :func:`train` returned. The card gets ``card_fields`` plus the datasets, the training settings
    and the last logged metrics. A run stopped by a signal leaves only its checkpoint: the final export belongs to a
    finished run.
    """
    accelerator.wait_for_everyone()
    if state["stopped_early"]:
        end_training(accelerator, setup)
        return
    # Under ZeRO-3 the full weights exist only once gathered, which every rank must take part in.
    state_dict = accelerator.get_state_dict(setup.model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(setup.model)
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
        image_processor.save_pretrained(args.output_dir)
        try:
            from model_cards import write_model_card
        except ImportError:
            write_model_card = None
        if write_model_card is not None:
            model_id = args.hub_model_id or args.output_dir
            card_fields = {
                **card_fields,
                "datasets": [data_args.dataset_name] if data_args.dataset_name else [],
                "training_args": training_summary(args, setup.learning_rate, setup.num_training_steps),
                "metrics": {key: value for key, value in state["last_metrics"].items() if key != "step"},
            }
            write_model_card(args.output_dir, card_kind, model_id=model_id, **card_fields)
        logger.info("Saved the model and its image processor in %s", args.output_dir)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            repo_id = args.hub_model_id or Path(args.output_dir).name
            api = HfApi(token=args.hub_token)
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f".tmp-{CHECKPOINT_PREFIX}*", "example_ids_*"],
                commit_message="Upload model trained with beitv2-hf",
            )
            logger.info("Pushed %s to the Hub as %s", args.output_dir, repo_id)
    accelerator.wait_for_everyone()
    end_training(accelerator, setup)


def end_training(accelerator: Accelerator, setup: PretrainingSetup) -> None:
    """Drop the prepared model, optimizer and data loader, then stop the trackers and the process group.

    The order matters under gloo: a DDP wrapper that outlives the process group holds its last reference, and
    the group's destructor then joins gloo's worker threads while holding the GIL; a worker freeing its last
    work item needs the GIL too. That deadlock hung about one 2-rank CPU run in ten with torch 2.13. Callers must
    not keep references of their own to ``setup.model``.
    """
    wrapped_model = weakref.ref(setup.model)
    setup.model = setup.optimizer = setup.scheduler = setup.dataloader = None
    accelerator.free_memory()  # forgets the prepared objects and runs gc.collect
    if wrapped_model() is not None and accelerator.num_processes > 1:
        logger.warning(
            "The prepared model is still referenced while the process group is destroyed; with gloo this can "
            "hang at exit. Referrers: %s",
            [type(referrer).__name__ for referrer in gc.get_referrers(wrapped_model())],
        )
    accelerator.end_training()


def training_summary(args: PretrainingArguments, learning_rate: float, num_training_steps: int) -> dict[str, Any]:
    """The settings a model card shows for a run."""
    return {
        "steps": num_training_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "peak_learning_rate": learning_rate,
        "min_learning_rate": args.min_learning_rate,
        "weight_decay": args.weight_decay,
        "adam_betas": (args.adam_beta1, args.adam_beta2),
        "warmup": args.warmup_steps if args.warmup_steps > 0 else f"{args.warmup_ratio:.3g} of the steps",
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": args.mixed_precision,
        "seed": args.seed,
    }
