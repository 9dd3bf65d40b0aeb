"""Training checkpoints that never corrupt a run: atomic, free of pickle, and careful with the last good weights.

``output_dir/checkpoint-{step}`` is a ``from_pretrained`` folder plus the optimizer, scheduler, grad scaler, random
and loop states as JSON + safetensors, ``run_identity.json`` and ``checkpoint.json`` (and the DeepSpeed engine's own
checkpoint). docs/pretraining.md ("Checkpoints and resuming") lists the files and what is guaranteed. Sections:
saving, loading, the output folder, validation before a resume, the run identity, the final export, pickle-free
state files and random states, DeepSpeed engine files.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import pickle
import pkgutil
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.image_processing_base import ImageProcessingMixin

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
ABANDONED_PREFIX = "abandoned-"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_INFO_FILE = "checkpoint.json"
RUN_IDENTITY_FILE = "run_identity.json"
TRAINING_STATE = "training_state_rank{rank}"
RNG_STATE = "rng_state_rank{rank}"
OPTIMIZER_STATE = "optimizer"
SCHEDULER_STATE = "scheduler"
GRAD_SCALER_STATE = "grad_scaler"
DEEPSPEED_FOLDER = "deepspeed"
DEEPSPEED_TAG = "engine"  # the engine checkpoint's sub-folder of deepspeed/


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, lost mount, quota...); earlier checkpoints are untouched."""


class CheckpointReadError(ValueError):
    """A checkpoint file is missing, cut short or malformed; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loop_state: dict[str, Any],
    dataloader_state: dict[str, Any],
    image_processor: ImageProcessingMixin | None = None,
    save_total_limit: int | None = None,
    weights_are_finite: bool = True,
    run_identity: dict[str, Any] | None = None,
) -> Path:
    """Save ``output_dir/checkpoint-{step}`` atomically, rotate old checkpoints, and return the folder. Every rank
    calls it, with the model and optimizer as ``accelerator.prepare`` returned them (the unwrapped model is a
    ``PreTrainedModel``) and its own ``loop_state`` and ``dataloader_state`` (JSON-able; tuples, non-string keys and
    tensors are kept exactly).

    Args:
        save_total_limit: keep the newest N checkpoints, plus the newest one with finite weights if it is older.
        weights_are_finite: False when the caller suspects the weights (e.g. a stop on non-finite losses). The
            weights are also checked here; either way a non-finite checkpoint is marked as such.

    Raises:
        CheckpointWriteError: writing failed on some rank; the partial folder is removed, earlier checkpoints stay.
        ValueError: an unsupported distributed setup or ``save_total_limit`` below 1.
    """
    _check_supported(accelerator)
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be None (keep all) or at least 1, got {save_total_limit}.")
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}"
    uses_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # Every rank takes part: under ZeRO-3 this gathers the partitioned weights (to the main process).
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def write_parts() -> None:
        if uses_deepspeed:
            # Collective: every rank writes its partition. This is the engine call accelerator.save_state makes;
            # save_state itself would add its RNG / scheduler pickles, which this module replaces.
            engine = cast(Any, model)  # a DeepSpeedEngine; deepspeed is optional, so its type is not imported
            engine.save_checkpoint(str(temporary / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, save_latest=False)
        rank = accelerator.process_index
        write_state(temporary, TRAINING_STATE.format(rank=rank), {"loop": loop_state, "dataloader": dataloader_state})
        write_state(temporary, RNG_STATE.format(rank=rank), capture_rng_states())
        if not accelerator.is_main_process:
            return
        nonfinite = nonfinite_tensors(state_dict)
        unwrapped: PreTrainedModel = accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "save_pretrained"):
            raise TypeError(f"The model must be a transformers PreTrainedModel, got {type(unwrapped).__name__}.")
        # In-memory parameter names (no reverse key conversion), so resuming is a plain load_state_dict;
        # from_pretrained reads both layouts.
        unwrapped.save_pretrained(temporary, state_dict=state_dict, save_original_format=False)
        if image_processor is not None:
            image_processor.save_pretrained(temporary)
        if not uses_deepspeed:  # under DeepSpeed the engine checkpoint holds the (partitioned) optimizer
            write_state(temporary, OPTIMIZER_STATE, optimizer.state_dict())
        write_state(temporary, SCHEDULER_STATE, scheduler.state_dict())
        if accelerator.scaler is not None:
            write_state(temporary, GRAD_SCALER_STATE, accelerator.scaler.state_dict())
        if run_identity is not None:
            (temporary / RUN_IDENTITY_FILE).write_text(json.dumps(run_identity, indent=2, sort_keys=True) + "\n")
        info = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "deepspeed": uses_deepspeed,
            "weights_are_finite": weights_are_finite and not nonfinite,
            "reported_nonfinite_by_caller": not weights_are_finite,
            "nonfinite_parameters": nonfinite,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (temporary / CHECKPOINT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if not info["weights_are_finite"]:
            logger.warning(
                "Checkpoint of step %d has non-finite weights (%s); rotation keeps the newest finite checkpoint.",
                step,
                f"parameters {', '.join(nonfinite[:5])}{'...' if len(nonfinite) > 5 else ''}"
                if nonfinite
                else "reported by the training loop",
            )

    # Each rank catches its own failure and the ranks agree on the outcome: a rank raising alone would leave the
    # others waiting for it forever.
    error = _attempt(write_parts)
    if not on_any_rank(accelerator, error is not None) and accelerator.is_main_process:
        error = _attempt(lambda: _fsync_tree(temporary))  # every rank has written its part by now
    if on_any_rank(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is not None and not isinstance(error, (OSError, RuntimeError, SafetensorError)):
            raise error  # a programming error (e.g. an optimizer state JSON cannot hold), not a write failure
        cause = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write its part"
        raise CheckpointWriteError(
            f"Could not write checkpoint {final} ({cause}). The file system of {output_dir} has "
            f"{_free_space(output_dir)} free. The partial checkpoint was removed and earlier checkpoints are "
            "untouched: free some space, lower --save_total_limit or choose another --output_dir, then resume with "
            "--resume_from_checkpoint latest."
        ) from error

    if accelerator.is_main_process:
        if final.exists():  # only when the same step is saved twice
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_directory(output_dir)
        rotate_checkpoints(output_dir, save_total_limit, final)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _attempt(function: Callable[[], None]) -> Exception | None:
    """Run ``function``; the exception it raised, or None."""
    try:
        function()
    except Exception as exc:  # noqa: BLE001 - raised on every rank once every rank knows
        return exc
    return None


def _check_supported(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise ValueError(
            "Checkpoints support one process, DDP (MULTI_GPU, MULTI_CPU, ...) or DeepSpeed, not "
            f"{accelerator.distributed_type.value}: the optimizer state would be saved as this rank's shard only."
        )


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf; one device-to-host copy per device."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() or tensor.is_complex():
            flags.setdefault(tensor.device, []).append((name, torch.isfinite(tensor).all()))
    nonfinite: list[str] = []
    for entries in flags.values():
        finite = torch.stack([flag for _, flag in entries]).tolist()
        nonfinite.extend(name for (name, _), ok in zip(entries, finite, strict=True) if not ok)
    return nonfinite


def on_any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (a collective: every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(tensor, reduction="sum").item() > 0)


def _free_space(folder: Path) -> str:
    """The free space of ``folder``'s file system, for the message of a failed write (a full disk)."""
    try:
        size = float(shutil.disk_usage(folder).free)
    except OSError:
        return "an unknown amount of space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _fsync_tree(folder: Path) -> None:
    """Flush everything under ``folder`` to disk, so the rename cannot expose files a crash would leave empty."""
    for path in [*sorted(folder.rglob("*")), folder]:
        if path.is_dir():
            _fsync_directory(path)
        else:
            with path.open("rb") as stream:
                os.fsync(stream.fileno())


def _fsync_directory(directory: Path) -> None:
    # Directories cannot be opened for fsync on some platforms (Windows); there the rename is all we can do.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the model, optimizer, scheduler (and fp16 grad scaler) saved by :func:`save_checkpoint` and return
    this rank's ``(loop_state, dataloader_state)``. Every rank calls it, with what ``accelerator.prepare`` returned;
    :func:`restore_rng_states` follows later. A ValueError says why a checkpoint cannot be resumed (see
    :func:`check_resumable`) or its weights do not fit the model.
    """
    _check_supported(accelerator)
    checkpoint = Path(checkpoint)
    info = check_resumable(accelerator, checkpoint)
    if not info["weights_are_finite"] and accelerator.is_main_process:
        bad = info["nonfinite_parameters"]
        finite = last_finite_checkpoint(checkpoint.parent, before=info["step"])
        logger.warning(
            "\n%s\nRESUMING FROM A NON-FINITE CHECKPOINT: %s: %s. %s\n%s",
            "!" * 80,
            checkpoint,
            f"{len(bad)} parameter(s) hold NaN/inf ({', '.join(bad[:5])})"
            if bad
            else "the run that saved it stopped on non-finite losses or gradients (its weights themselves are finite)",
            f"To resume from the newest finite weights instead, pass --resume_from_checkpoint {finite}."
            if finite
            else "No earlier checkpoint with finite weights exists in this folder.",
            "!" * 80,
        )
    if info["deepspeed"]:
        load_deepspeed_engine(model, checkpoint / DEEPSPEED_FOLDER)
    else:
        _load_model_weights(accelerator.unwrap_model(model), checkpoint)
        optimizer.load_state_dict(read_state(checkpoint, OPTIMIZER_STATE))
    scheduler.load_state_dict(read_state(checkpoint, SCHEDULER_STATE))
    # A saved scale without a scaler now is fine: switching fp16 to bf16 is the usual cure for non-finite losses.
    if accelerator.scaler is not None and (checkpoint / f"{GRAD_SCALER_STATE}.json").is_file():
        accelerator.scaler.load_state_dict(read_state(checkpoint, GRAD_SCALER_STATE))
    elif accelerator.scaler is not None:
        logger.info("%s has no fp16 loss-scaler state (saved without fp16): the loss scale starts afresh.", checkpoint)
    state = read_state(checkpoint, TRAINING_STATE.format(rank=accelerator.process_index))
    return state["loop"], state["dataloader"]


def _load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load ``model.safetensors`` (or its shards) into ``model`` exactly; tied copies come back through the tie."""
    saved: dict[str, torch.Tensor] = {}
    for file in _weight_files(checkpoint)[0]:  # validated by check_resumable
        saved.update(load_file(file))
    own = model.state_dict()
    unexpected = sorted(saved.keys() - own.keys())
    # save_pretrained leaves out parameters tied to another one (e.g. an output embedding tied to the input one).
    loaded_storage = {own[name].data_ptr() for name in saved.keys() & own.keys()}
    missing = sorted(name for name in own.keys() - saved.keys() if own[name].data_ptr() not in loaded_storage)
    if unexpected or missing:
        raise ValueError(
            f"The weights in {checkpoint} do not fit the model ({type(model).__name__}): missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}."
        )
    model.load_state_dict(saved, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# The output folder: listing, resolving, setting aside, rotation


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (not the ``.tmp-checkpoint-N`` of interrupted saves)."""
    return [path for _, path in _checkpoints_by_step(output_dir)]


def _checkpoints_by_step(output_dir: str | Path) -> list[tuple[int, Path]]:
    found = [(checkpoint_step(path), path) for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-{step}`` folder, or None for any other name."""
    match = re.fullmatch(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)", path.name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from for ``resume_from_checkpoint``: None (a fresh run), ``"latest"`` (the newest
    checkpoint in ``output_dir``, finite or not; None with an info line when there is none) or an intact checkpoint
    folder's path (else a ValueError says why)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"Checkpoint folder {path} does not exist.")
    if not (path / CHECKPOINT_INFO_FILE).is_file():
        raise ValueError(f"{path} is not a checkpoint folder: it has no {CHECKPOINT_INFO_FILE}.")
    raise_unless_intact(path)  # names every bad file and the newest intact checkpoint
    return path


def check_resumable(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's info, after checking that its files are intact (:func:`raise_unless_intact`) and that it
    belongs to this process count and distributed setup (else a ValueError)."""
    info, _ = _read_json(Path(checkpoint) / CHECKPOINT_INFO_FILE)
    # Another process count first: a checkpoint of 2 ranks read by 1 lacks nothing, it belongs elsewhere.
    saved_processes = info.get("num_processes") if isinstance(info, dict) else None
    if not _has_type(saved_processes, int) or saved_processes == accelerator.num_processes:
        raise_unless_intact(checkpoint)
    if info["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was written by {info['num_processes']} processes but {accelerator.num_processes} are "
            "running: the data streams, RNG states and total batch size belong to that process count; resume with "
            "the same number."
        )
    if info["deepspeed"] != (accelerator.distributed_type == DistributedType.DEEPSPEED):
        written, running = ("with", "without") if info["deepspeed"] else ("without", "with")
        raise ValueError(
            f"{checkpoint} was written {written} DeepSpeed but this run is {running} it: the optimizer state is "
            f"stored {'by the DeepSpeed engine' if info['deepspeed'] else 'unpartitioned'}; resume it the same way, "
            f"or start from its weights (from_pretrained on {checkpoint})."
        )
    return info


def prepare_output_dir(accelerator: Accelerator, output_dir: str | Path, checkpoint: Path | None) -> None:
    """Make ``output_dir`` ready for a fresh run (``checkpoint`` None) or for resuming from ``checkpoint``; every rank
    calls it before training. It first refuses (ValueError) a fresh run over checkpoints (rotation and ``latest`` go
    by step number) and a checkpoint this run cannot resume; then it removes interrupted saves and moves what came
    after the resumed step (checkpoints, their export, ``metrics.jsonl`` records) into ``abandoned-<UTC time>/``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    later: list[Path] = []
    resumed_step = None
    if checkpoint is None:
        if earlier := list_checkpoints(output_dir):
            raise ValueError(
                f"{output_dir} holds checkpoints of an earlier run ({', '.join(path.name for path in earlier)}): "
                "pass --resume_from_checkpoint latest to continue it, or use another --output_dir (or delete them)."
            )
    else:
        resumed_step = check_resumable(accelerator, checkpoint)["step"]
        later = [
            path
            for step, path in _checkpoints_by_step(output_dir)
            if step > resumed_step and path.resolve() != checkpoint.resolve()
        ]
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes the folder
    if accelerator.is_main_process:
        for interrupted in output_dir.glob(f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(interrupted, ignore_errors=True)
        _recover_export(output_dir)
        _set_aside_abandoned(output_dir, later, resumed_step)
    accelerator.wait_for_everyone()  # no rank writes into the folder before it is ready


def _set_aside_abandoned(output_dir: Path, later: list[Path], resumed_step: int | None) -> None:
    """Move the ``later`` checkpoints, their export and the metrics records after ``resumed_step`` (all of them for
    a fresh run) into a new ``abandoned-*`` folder."""
    metrics_file = output_dir / METRICS_FILE
    kept, dropped = _split_metrics(metrics_file, resumed_step)
    if not later and not dropped:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder, attempt = output_dir / f"{ABANDONED_PREFIX}{stamp}", 0
    while folder.exists():  # two resumes within one second
        attempt += 1
        folder = output_dir / f"{ABANDONED_PREFIX}{stamp}-{attempt}"
    folder.mkdir()
    # An export is written only at a run's last step, after its last checkpoint: with later checkpoints set aside,
    # the export at the top belongs to the abandoned branch too.
    exported = export_files(output_dir) if later else []
    for path in later + exported:
        os.replace(path, folder / path.name)
    if dropped:
        # The dropped lines are safe in the abandoned folder before metrics.jsonl is replaced.
        (folder / METRICS_FILE).write_text("".join(line + "\n" for line in dropped))
        if kept:
            partial = metrics_file.with_name(f"{TEMPORARY_PREFIX}{METRICS_FILE}")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, metrics_file)
        else:
            metrics_file.unlink()
    if resumed_step is None:
        logger.warning("A fresh run in %s: moved the earlier run's %s to %s.", output_dir, METRICS_FILE, folder)
        return
    moved = ", ".join(path.name for path in later) if later else "no checkpoint"
    if exported:
        moved += f" and the final export ({', '.join(path.name for path in exported)})"
    logger.warning(
        "Resuming from step %d abandons what was saved after it: moved %s and %d %s record(s) after step %d to %s.",
        resumed_step,
        moved,
        len(dropped),
        METRICS_FILE,
        resumed_step,
        folder,
    )


def _split_metrics(metrics_file: Path, step: int | None) -> tuple[list[str], list[str]]:
    """Lines of ``metrics.jsonl`` kept by a run resuming at ``step`` and the lines it drops (all for None)."""
    kept: list[str] = []
    dropped: list[str] = []
    for line in metrics_file.read_text().splitlines() if metrics_file.is_file() else []:
        try:
            belongs = step is not None and json.loads(line).get("step", step) <= step
        except (json.JSONDecodeError, AttributeError, TypeError):  # e.g. a line cut short by a kill
            belongs = False
        (kept if belongs else dropped).append(line)
    return kept, dropped


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None, newest: Path) -> None:
    """Delete all but the newest ``save_total_limit`` checkpoints, never the newest one with finite weights."""
    if save_total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    keep = {newest, last_finite_checkpoint(output_dir), *checkpoints[-save_total_limit:]}
    for old in checkpoints:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def last_finite_checkpoint(output_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest checkpoint in ``output_dir`` (of a step before ``before``) whose ``checkpoint.json`` vouches for
    finite weights, or None."""
    for step, path in reversed(_checkpoints_by_step(output_dir)):
        if (before is None or step < before) and has_finite_weights(path):
            return path
    return None


def resume_advice(output_dir: str | Path) -> str:
    """How to continue a run whose weights broke: resume from the last checkpoint with finite weights."""
    finite = last_finite_checkpoint(output_dir)
    if finite is None:
        return f"no checkpoint in {output_dir} has finite weights: start again with a lower learning rate"
    return (
        "lower the learning rate, enable --max_grad_norm or switch fp16 to bf16, then resume from the last "
        f"checkpoint with finite weights: --resume_from_checkpoint {finite}"
    )


def has_finite_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint.json`` vouches for finite weights (False for a folder that is not a checkpoint)."""
    info, _ = _read_json(Path(checkpoint) / CHECKPOINT_INFO_FILE)
    return isinstance(info, dict) and info.get("weights_are_finite") is True


# ---------------------------------------------------------------------------------------------------------------
# Validation: every file a resume reads, checked before anything is loaded or the output folder changes

# The JSON types of checkpoint.json's fields (bool is checked apart from int: True is not a step count).
_INFO_TYPES = {
    "format_version": int,
    "step": int,
    "num_processes": int,
    "distributed_type": str,
    "deepspeed": bool,
    "weights_are_finite": bool,
    "reported_nonfinite_by_caller": bool,
    "nonfinite_parameters": list,
    "saved_at": str,
}


def validate_checkpoint(checkpoint: str | Path) -> list[str]:
    """Every problem with the files a resume from ``checkpoint`` reads (field types, steps that disagree with the
    folder name, missing tensors...), each "<file> <what is wrong>"; empty when it is intact. Reads JSON and
    safetensors headers only and needs no collective: every rank reaches the same verdict on the shared folder.
    """
    checkpoint = Path(checkpoint)
    info_file = checkpoint / CHECKPOINT_INFO_FILE
    info, problem = _read_json(info_file)
    if problem or not isinstance(info, dict):
        return [problem or f"{info_file} holds a {type(info).__name__}, not a JSON object"]
    problems = [
        f"{info_file}: {key} is {info[key]!r} ({type(info[key]).__name__}), not {kind.__name__}"
        for key, kind in _INFO_TYPES.items()
        if key in info and not _has_type(info[key], kind)
    ]
    required = ("format_version", "step", "num_processes", "deepspeed")
    problems += [f"{info_file}: {key} is missing" for key in required if key not in info]
    if problems:
        return problems
    if info["format_version"] != FORMAT_VERSION:
        return [f"{info_file}: format version {info['format_version']}; this code reads version {FORMAT_VERSION}"]
    folder_step = checkpoint_step(checkpoint)
    if folder_step is not None and info["step"] != folder_step:
        problems.append(f"{info_file}: step {info['step']} disagrees with the folder name {checkpoint.name}")
    if not info["deepspeed"]:
        weight_files, problem = _weight_files(checkpoint)
        problems += [problem] if problem else [p for file in weight_files if (p := _safetensors_keys(file)[1])]
        problems += _state_problems(checkpoint, OPTIMIZER_STATE)[1]
    scheduler, scheduler_problems = _state_problems(checkpoint, SCHEDULER_STATE)
    problems += scheduler_problems
    if scheduler is not None and not _has_type(
        scheduler.get("last_epoch") if isinstance(scheduler, dict) else None, int
    ):
        problems.append(f"{checkpoint / SCHEDULER_STATE}.json: last_epoch is not an integer")
    if (checkpoint / f"{GRAD_SCALER_STATE}.json").is_file():
        problems += _state_problems(checkpoint, GRAD_SCALER_STATE)[1]
    for rank in range(max(1, info["num_processes"])):
        stem = TRAINING_STATE.format(rank=rank)
        state, state_problems = _state_problems(checkpoint, stem)
        problems += state_problems
        if state is not None:
            loop = state.get("loop") if isinstance(state, dict) else None
            step = loop.get("step") if isinstance(loop, dict) else None
            if not isinstance(loop, dict) or not isinstance(state.get("dataloader"), dict):
                problems.append(f"{checkpoint / stem}.json lacks its loop or dataloader object")
            elif not _has_type(step, int):
                problems.append(f"{checkpoint / stem}.json: loop step is {step!r} ({type(step).__name__}), not int")
            elif step != info["step"]:
                problems.append(
                    f"{checkpoint / stem}.json: loop step {step} disagrees with the folder name {checkpoint.name} "
                    f"(and {CHECKPOINT_INFO_FILE} step {info['step']})"
                )
        problems += _state_problems(checkpoint, RNG_STATE.format(rank=rank))[1]
    return problems


def raise_unless_intact(checkpoint: str | Path) -> None:
    """Raise one :class:`CheckpointReadError` naming every bad file of ``checkpoint`` and the newest intact checkpoint
    beside it, when :func:`validate_checkpoint` finds a problem."""
    checkpoint = Path(checkpoint)
    problems = validate_checkpoint(checkpoint)
    if not problems:
        return
    others = [path for path in list_checkpoints(checkpoint.parent) if path.resolve() != checkpoint.resolve()]
    intact = next((path for path in reversed(others) if not validate_checkpoint(path)), None)
    if intact is None:
        advice = f"No intact checkpoint in {checkpoint.parent}."
    else:
        finite = "" if has_finite_weights(intact) else " (its weights are not finite)"
        advice = (
            f"The newest intact checkpoint is {intact}{finite}: pass --resume_from_checkpoint {intact} (what was "
            f"trained after it is set aside), or delete {checkpoint.name}."
        )
    raise CheckpointReadError(f"Cannot resume from {checkpoint}: {'; '.join(problems)}. {advice}")


def _has_type(value: Any, kind: type) -> bool:
    return isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)


def _read_json(path: Path, **kwargs: Any) -> tuple[Any, str | None]:
    """The JSON value in ``path`` (``kwargs`` go to ``json.loads``), or None and what is wrong with the file."""
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        return json.loads(path.read_text(), **kwargs), None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"


def _weight_files(checkpoint: Path) -> tuple[list[Path], str | None]:
    """``model.safetensors``, or the shards its index names; or what is wrong with the index."""
    index_file = checkpoint / "model.safetensors.index.json"
    if (checkpoint / "model.safetensors").is_file() or not index_file.is_file():
        return [checkpoint / "model.safetensors"], None
    index, problem = _read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if problem or not isinstance(weight_map, dict):
        return [], problem or f"{index_file} has no weight_map object"
    return [checkpoint / name for name in sorted(set(map(str, weight_map.values())))], None


def _safetensors_keys(path: Path) -> tuple[set[str], str | None]:
    """The tensor names of a safetensors file, or what is wrong with it. Reads the header only; ``safe_open`` checks
    that it parses and that the tensors' offsets fit their shapes and cover the file exactly (a cut file fails)."""
    if not path.is_file():
        return set(), f"{path} is missing"
    try:
        with safe_open(path, framework="pt") as file:
            return set(file.keys()), None
    except SafetensorError as error:
        what = "empty" if path.stat().st_size == 0 else "corrupt or truncated"
        return set(), f"{path} is {what}: not a readable safetensors file ({error})"


def _state_problems(folder: Path, stem: str) -> tuple[Any, list[str]]:
    """A :func:`write_state` pair's JSON (None when unusable) and its problems: the JSON parses and every tensor it
    refers to is in the sibling safetensors file."""
    references: set[str] = set()

    def note_tensor(value: dict[str, Any]) -> dict[str, Any]:
        if len(value) == 1 and "__tensor__" in value:
            references.add(str(value["__tensor__"]))
        return value

    encoded, problem = _read_json(folder / f"{stem}.json", object_hook=note_tensor)
    if problem or not references:
        return encoded, [problem] if problem else []
    tensor_file = folder / f"{stem}.safetensors"
    names, problem = _safetensors_keys(tensor_file)
    if problem:
        return None, [problem]
    if lacking := sorted(references - names):
        return None, [
            f"{tensor_file} lacks {len(lacking)} tensors that {stem}.json refers to ({', '.join(lacking[:3])})"
        ]
    return encoded, []


# ---------------------------------------------------------------------------------------------------------------
# Run identity: what defines the run, recorded in each checkpoint and compared on resume

# Config keys that describe the file or the attention kernel rather than what is trained.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "attn_implementation"}
)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of ``module``'s parameters and buffers (names, dtypes, shapes, bytes), whatever the file layout."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return f"blake2b:{digest.hexdigest()}"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def run_identity(
    *,
    model_config: dict[str, Any],
    frozen_model: dict[str, Any],
    fixed: dict[str, Any],
    changeable: dict[str, Any],
    changeable_config_keys: frozenset[str],
) -> dict[str, Any]:
    """What defines a run, as recorded in ``run_identity.json``: ``fixed`` (the tokenizer or teacher in
    ``frozen_model``, the seed...; never changes on resume) and ``changeable`` (batch size, precision...; changes
    only with ``--resume_allow_changes``), flattened to ``name: JSON value``. The keys of ``model_config`` whose last
    part is in ``changeable_config_keys`` (drop path, dropout...) are changeable, its other keys fixed.
    """
    config = {
        key: value
        for key, value in _flatten(json.loads(json.dumps(model_config, default=str))).items()
        if not key.split(".")[-1].startswith("_") and key.split(".")[-1] not in _VOLATILE_CONFIG_KEYS
    }
    identity: dict[str, dict[str, Any]] = {"fixed": {**frozen_model, **fixed}, "changeable": dict(changeable)}
    for key, value in config.items():
        part = "changeable" if key.split(".")[-1] in changeable_config_keys else "fixed"
        identity[part][f"model config {key}"] = value
    return {"format_version": 1, **json.loads(json.dumps(identity, default=str))}


def check_run_identity(
    checkpoint: Path | None, identity: dict[str, Any], *, allow_changes: bool
) -> dict[str, dict[str, Any]]:
    """Compare ``identity`` with the one recorded in ``checkpoint``, before anything changes, and return the accepted
    changes ``{name: {"saved": ..., "now": ...}}`` (only with ``allow_changes``). A ValueError names every difference
    when a fixed setting differs, or a changeable one does without ``allow_changes``.
    """
    if checkpoint is None:
        return {}
    path = Path(checkpoint) / RUN_IDENTITY_FILE
    saved, problem = _read_json(path)  # every checkpoint the pretraining scripts write has one
    if problem or not isinstance(saved, dict):
        raise CheckpointReadError(f"Cannot resume from {checkpoint}: {problem or f'{path} is not a JSON object'}.")

    def differences(part: str) -> dict[str, dict[str, Any]]:
        before, now = saved.get(part, {}), identity[part]
        return {
            key: {"saved": before.get(key), "now": now.get(key)}
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)
        }

    def describe(changes: dict[str, dict[str, Any]]) -> str:
        return "; ".join(f"{key} saved {value['saved']!r}, now {value['now']!r}" for key, value in changes.items())

    fixed, changeable = differences("fixed"), differences("changeable")
    parts = [f"Fixed (start a new run to change them): {describe(fixed)}."] if fixed else []
    if changeable and not allow_changes:
        parts.append(f"Changeable with --resume_allow_changes: {describe(changeable)}.")
    if parts:
        raise ValueError(f"Cannot resume from {checkpoint}: the run was different. {' '.join(parts)}")
    if changeable:
        logger.warning(
            "Resuming from %s with deliberate changes (--resume_allow_changes): %s.", checkpoint, describe(changeable)
        )
    return changeable


def record_resume_changes(
    accelerator: Accelerator, output_dir: str | Path, step: int, changes: dict[str, dict[str, Any]]
) -> None:
    """Append ``{"step": step, "resume_changes": changes}`` to ``metrics.jsonl`` (main process), when any."""
    if changes and accelerator.is_main_process:
        with (Path(output_dir) / METRICS_FILE).open("a") as stream:
            stream.write(json.dumps({"step": step, "resume_changes": changes}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The final export: written aside, then moved into place

EXPORT_TEMPORARY = ".tmp-export"
EXPORT_PREVIOUS = ".old-export"
# What save_pretrained of the model and its image processor and the model card write at the top of --output_dir.
_EXPORT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "README.md",
)
# The native feature-extraction folder run_mim.py writes into its export (`run_mim.export_feature_extractor`).
FEATURE_EXTRACTOR_DIR = "feature-extraction"


class ExportWriteError(OSError):
    """The final export could not be written; the previous export (if any) is untouched."""


def export_files(output_dir: str | Path) -> list[Path]:
    """The files of a final export at the top of ``output_dir`` (weights, configs, processor, model card), and its
    native feature-extraction folder."""
    output_dir = Path(output_dir)
    found = {path for pattern in _EXPORT_PATTERNS for path in output_dir.glob(pattern) if path.is_file()}
    if (output_dir / FEATURE_EXTRACTOR_DIR).is_dir():
        found.add(output_dir / FEATURE_EXTRACTOR_DIR)
    return sorted(found)


def write_export(output_dir: str | Path, write: Callable[[Path], None], final_checkpoint: Path | None) -> None:
    """``write(folder)`` the export into ``output_dir/.tmp-export``, flush it, then swap it with the previous export
    file by file (the previous one waits in ``.old-export`` until the new one is in place). A failed write raises
    :class:`ExportWriteError` naming the free space, and leaves the previous export untouched.
    """
    output_dir = Path(output_dir)
    staging, previous = output_dir / EXPORT_TEMPORARY, output_dir / EXPORT_PREVIOUS
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        _fsync_tree(staging)
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        remedy = (
            f"the final checkpoint {final_checkpoint} holds the same weights: free some space and run again with "
            "--resume_from_checkpoint latest to export it (nothing is retrained)"
            if final_checkpoint is not None
            else "free some space and run again"
        )
        raise ExportWriteError(
            f"Could not write the final model to {output_dir} ({type(error).__name__}: {error}). The file system of "
            f"{output_dir} has {_free_space(output_dir)} free. The previous export in {output_dir}, if any, is "
            f"untouched; {remedy}."
        ) from error
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for path in export_files(output_dir):
        os.replace(path, previous / path.name)
    for path in sorted(staging.iterdir()):
        os.replace(path, output_dir / path.name)
    _fsync_directory(output_dir)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _recover_export(output_dir: Path) -> None:
    """After a crash during :func:`write_export`'s swap: put back the previous export's files that are not in place."""
    shutil.rmtree(output_dir / EXPORT_TEMPORARY, ignore_errors=True)
    previous = output_dir / EXPORT_PREVIOUS
    if not previous.is_dir():
        return
    if not any((output_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        for path in previous.iterdir():
            if not (output_dir / path.name).exists():
                os.replace(path, output_dir / path.name)
    shutil.rmtree(previous, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# State dicts as JSON + safetensors, no pickle; random states

# The keys that mark a tagged value; a dict holding one (or a non-string key) is stored as its items.
_TAGS = ("__tensor__", "__tuple__", "__items__")


def write_state(folder: Path, stem: str, state: Any) -> None:
    """Write ``state`` (tensors, numbers, strings, None, lists, tuples and dicts, else a TypeError) as
    ``folder/{stem}.json``, plus ``folder/{stem}.safetensors`` when it holds tensors."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, stem)
    if tensors:
        save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(encoded))


def read_state(folder: Path, stem: str) -> Any:
    """What :func:`write_state` wrote; tensors come back on the CPU (``load_state_dict`` moves them)."""
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}

    def decode(value: dict[str, Any]) -> Any:  # json calls it innermost object first
        if len(value) == 1 and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if len(value) == 1 and "__tuple__" in value:
            return tuple(value["__tuple__"])
        if len(value) == 1 and "__items__" in value:
            return dict(value["__items__"])
        return value

    return json.loads((folder / f"{stem}.json").read_text(), object_hook=decode)


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = path
        while name in tensors:  # only for dict keys that contain dots; keeps names unique
            name += "_"
        # A copy on the CPU: safetensors refuses tensors that share memory, and writes from host memory anyway.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not any(tag in value for tag in _TAGS):
            return {key: _encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {
            "__items__": [
                [_encode(key, tensors, f"{path}.key"), _encode(item, tensors, f"{path}.{key}")]
                for key, item in value.items()
            ]
        }
    raise TypeError(
        f"Cannot store {type(value).__name__} at {path!r} in a checkpoint without pickle; state dicts may hold "
        "tensors, numbers, strings, None, lists, tuples and dicts."
    )


def capture_rng_states() -> dict[str, Any]:
    """This process's random states, as :func:`restore_rng_states` reads them back: ``python`` and ``numpy`` (tuples
    and lists), ``torch`` (a CPU tensor), ``cuda`` (one tensor per visible device, None without CUDA) and
    ``cuda_device`` (the current device)."""
    # numpy's stubs give get_state() the type of get_state(legacy=False); at run time it is the legacy tuple.
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, key, position, has_gauss, cached_gaussian = numpy_state
    cuda = torch.cuda.is_available()
    return {
        "python": random.getstate(),
        "numpy": (kind, key.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "cuda_device": torch.cuda.current_device() if cuda else None,
    }


def restore_rng_states(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore this rank's python ``random``, numpy and torch (CPU and CUDA) random states from ``checkpoint``.

    Separate from :func:`load_checkpoint` because the loop must create its DataLoader iterator (which draws from the
    torch RNG) first: a resumed run then continues the uninterrupted run's random stream exactly.
    """
    states = read_state(Path(checkpoint), RNG_STATE.format(rank=accelerator.process_index))
    random.setstate(states["python"])
    kind, key, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    saved_cuda = states["cuda"]
    if saved_cuda is None or not torch.cuda.is_available():
        if saved_cuda is not None or torch.cuda.is_available():
            logger.warning("CUDA random states are not restored: the checkpoint and this run differ in using CUDA.")
    elif len(saved_cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved_cuda)
    else:
        logger.warning(
            "The checkpoint saw %d CUDA devices per process, this run sees %d: only the current device's random "
            "state is restored.",
            len(saved_cuda),
            torch.cuda.device_count(),
        )
        torch.cuda.set_rng_state(saved_cuda[states["cuda_device"]], device=torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed engine checkpoints, read without unpickling code

# The only Python classes (besides plain containers and tensors) that DeepSpeed 0.19 pickles into its engine
# checkpoints: found by loading ZeRO-2/3 (fp32) and ZeRO-1 (bf16) checkpoints with `weights_only=True`, plus fp16's
# dynamic loss scaler.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
# DeepSpeed checkpoint engines whose files are plain torch.save files (DataStates has a format of its own).
_TORCH_FORMAT_ENGINES = {"TorchCheckpointEngine", "FastCheckpointEngine", "DecoupledCheckpointEngine"}


def load_deepspeed_engine(engine: Any, folder: Path) -> None:
    """Load the model and (partitioned) optimizer of ``engine`` (a DeepSpeed engine, as ``accelerator.prepare``
    returned it) from ``folder``, in DeepSpeed's own format, without running code (else a ValueError).

    DeepSpeed's checkpoint engines read ``torch.save`` files with ``torch.load`` (``TorchCheckpointEngine`` with
    ``weights_only=False``) and offer no switch, so ``load`` is replaced on this engine's instance for the duration
    by a ``weights_only=True`` load that allows the classes of :data:`DEEPSPEED_SAFE_GLOBALS` only.
    """
    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine).__name__ not in _TORCH_FORMAT_ENGINES:
        raise ValueError(
            f"DeepSpeed's checkpoint engine is {type(checkpoint_engine).__name__}; resuming supports the engines that "
            f"write torch.save files ({', '.join(sorted(_TORCH_FORMAT_ENGINES))}), which can be read without "
            "unpickling code."
        )
    allowed = [pkgutil.resolve_name(name) for name in DEEPSPEED_SAFE_GLOBALS]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"DeepSpeed checkpoint file {path} holds a Python object outside DEEPSPEED_SAFE_GLOBALS and was not "
                f"unpickled (unpickling can execute code). If the file is yours and the class is harmless data, add "
                f"it to pretraining.checkpoints.DEEPSPEED_SAFE_GLOBALS. {exc}"
            ) from None

    checkpoint_engine.load = load
    try:
        load_path, _ = engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_module_strict=True, load_lr_scheduler_states=False
        )
    finally:
        del checkpoint_engine.load  # the class's method again
    if load_path is None:
        raise ValueError(f"DeepSpeed found no engine checkpoint in {folder}.")
