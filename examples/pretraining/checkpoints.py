"""Training checkpoints that never corrupt a run: atomic, free of pickle, and careful with the last good weights.

One checkpoint is a folder ``output_dir/checkpoint-{step}``::

    config.json, model.safetensors       ``save_pretrained`` of the unwrapped model (parameter names as in memory),
                                         so every checkpoint loads with ``from_pretrained``
    preprocessor_config.json             the image processor, when one is given (as in Trainer checkpoints)
    optimizer.json, optimizer.safetensors
                                         param groups and hyper-parameters, then the state tensors (not under
                                         DeepSpeed, whose engine owns the optimizer)
    scheduler.json                       the learning-rate scheduler's ``state_dict``
    grad_scaler.json                     fp16 only: the loss scale and its growth tracker
    rng_state_rank{N}.json, .safetensors rank N's python ``random``, numpy and torch (CPU, every CUDA device) states
    training_state_rank{N}.json          rank N's loop state and data-loader state, as the loop gives them
    run_identity.json                    what defines the run (model config, tokenizer/teacher fingerprint, seed,
                                         batch, accumulation, mask, precision), compared on resume
    checkpoint.json                      step, process count, whether the weights are finite, when it was saved
    deepspeed/                           DeepSpeed only: the engine's own checkpoint (see below)

Guarantees:

* **Atomic.** Everything is written into ``.tmp-checkpoint-{step}``, flushed to disk, and renamed once every rank
  has finished, so a run killed mid-save never leaves a folder that looks complete;
  :func:`prepare_output_dir` clears such leftovers. This needs a file system shared by all ranks,
  as multi-node checkpointing always does.
* **Loading executes no code.** Tensors are safetensors, everything else JSON; files of any other kind in a
  checkpoint folder (a planted ``.pkl`` or ``.bin``; the Hub custom code ``save_pretrained`` copies, which only
  ``trust_remote_code`` imports) are never opened. The one exception is DeepSpeed: its engine
  (model shards, ZeRO-partitioned optimizer) has its own ``torch.save`` format, kept in ``deepspeed/``. Those files
  are read with ``torch.load(weights_only=True)`` and only the few DeepSpeed classes listed in
  :data:`DEEPSPEED_SAFE_GLOBALS` are allowed in them, so no code runs there either.
* **The last good weights survive.** A checkpoint whose weights are not finite (the caller says so, or a parameter
  holds NaN/inf) is marked in ``checkpoint.json``; rotation by ``save_total_limit`` always keeps the newest finite
  checkpoint besides the newest ones. ``latest`` still means the newest checkpoint: a non-finite stop skips the bad
  updates, so its checkpoint usually holds sound weights and the right step count; resuming from a non-finite
  checkpoint warns loudly and names the newest finite one to pass instead.
* **Runs never mix.** Resuming from ``checkpoint-K`` while checkpoints of later steps exist (an abandoned branch)
  moves them, and the ``metrics.jsonl`` records after step K, into ``output_dir/abandoned-<UTC time>/``.
* **A failed save is harmless and says why.** Any error while writing removes the temporary folder, leaves the
  earlier checkpoints untouched, and is raised on every rank as :class:`CheckpointWriteError` naming the path and
  the free space left (a full disk otherwise shows as ``basic_ios::clear: iostream error``).

Supported: one process, DDP (``MULTI_GPU``/``MULTI_CPU``/...), DeepSpeed ZeRO 1-3 (under ZeRO-3 the weights for
``model.safetensors`` are gathered, so the config needs ``stage3_gather_16bit_weights_on_model_save``). FSDP and
Megatron-LM are refused.

Sections, top-down: saving and loading one checkpoint (:func:`save_checkpoint`, :func:`load_checkpoint`,
:func:`restore_rng_states`); the output folder (:func:`resolve_checkpoint`, :func:`prepare_output_dir`, rotation);
validation before a resume (:func:`validate_checkpoint`, :func:`raise_unless_intact`); the run identity
(:func:`run_identity`, :func:`check_run_identity`); the final export (:func:`write_export`); the pickle-free state
files (:func:`write_state`, :func:`read_state`); random states; DeepSpeed engine files.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.image_processing_base import ImageProcessingMixin

logger = logging.getLogger(__name__)

RNG_STATE = "rng_state_rank{rank}"
OPTIMIZER_STATE = "optimizer"
SCHEDULER_STATE = "scheduler"
GRAD_SCALER_STATE = "grad_scaler"
DEEPSPEED_FOLDER = "deepspeed"

_SUPPORTED_TYPES_HINT = "one process, DDP (MULTI_GPU, MULTI_CPU, ...) or DeepSpeed"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, lost mount, quota...); earlier checkpoints are untouched."""


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
    """Save ``output_dir/checkpoint-{step}`` atomically, then rotate old checkpoints. Every rank calls it.

    Args:
        accelerator: the run's Accelerator.
        output_dir: the run's output folder.
        step: the number of optimizer steps done.
        model: the model as ``accelerator.prepare`` returned it (DDP wrapper, DeepSpeed engine or the model); the
            unwrapped model must be a ``PreTrainedModel``.
        optimizer: the optimizer as ``accelerator.prepare`` returned it.
        scheduler: the learning-rate scheduler (not prepared, stepped once per optimizer step).
        loop_state: this rank's loop counters; JSON-able (tuples, non-string keys and tensors are kept exactly).
        dataloader_state: this rank's data-loader state, same rules.
        image_processor: saved with the model so the checkpoint is a complete ``from_pretrained`` folder.
        save_total_limit: keep the newest N checkpoints, plus the newest one with finite weights if it is older.
        weights_are_finite: False when the caller suspects the weights (e.g. a stop on non-finite losses). The
            weights are also checked here; either way a non-finite checkpoint is marked as such.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointWriteError: writing failed on some rank; the partial folder is removed on every rank's behalf and
            earlier checkpoints are untouched.
        ValueError: an unsupported distributed setup or ``save_total_limit`` below 1.
    """
    _check_supported(accelerator)
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be None (keep all) or at least 1, got {save_total_limit}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
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
            model.save_checkpoint(str(temporary / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, save_latest=False)
        rank = accelerator.process_index
        write_state(temporary, TRAINING_STATE.format(rank=rank), {"loop": loop_state, "dataloader": dataloader_state})
        write_state(temporary, RNG_STATE.format(rank=rank), capture_rng_states())
        if accelerator.is_main_process:
            _write_main_process_files(
                accelerator, temporary, step, model, optimizer, scheduler, state_dict, image_processor,
                weights_are_finite, uses_deepspeed, run_identity,
            )  # fmt: skip

    # Each rank catches its own failure and the ranks agree on the outcome: a rank raising alone would leave the
    # others waiting for it forever.
    error = _attempt(write_parts)
    if not on_any_rank(accelerator, error is not None) and accelerator.is_main_process:
        error = _attempt(lambda: _fsync_tree(temporary))  # every rank has written its part by now
    if on_any_rank(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        _raise_write_error(final, output_dir, error)

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
    except Exception as exc:  # noqa: BLE001 - handed to _raise_write_error once every rank knows
        return exc
    return None


def _write_main_process_files(
    accelerator: Accelerator,
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state_dict: dict[str, torch.Tensor],
    image_processor: ImageProcessingMixin | None,
    weights_are_finite: bool,
    uses_deepspeed: bool,
    run_identity: dict[str, Any] | None,
) -> None:
    """What exists once per checkpoint: weights, processor, optimizer, scheduler, grad scaler, the run identity, then
    the info file."""
    nonfinite = nonfinite_tensors(state_dict)
    unwrapped: PreTrainedModel = accelerator.unwrap_model(model)
    if not hasattr(unwrapped, "save_pretrained"):
        raise TypeError(f"The model must be a transformers PreTrainedModel, got {type(unwrapped).__name__}.")
    # In-memory parameter names (no reverse key conversion), so resuming is a plain load_state_dict;
    # from_pretrained reads both layouts.
    unwrapped.save_pretrained(folder, state_dict=state_dict, save_original_format=False)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    if not uses_deepspeed:  # under DeepSpeed the engine checkpoint holds the (partitioned) optimizer
        write_state(folder, OPTIMIZER_STATE, optimizer.state_dict())
    write_state(folder, SCHEDULER_STATE, scheduler.state_dict())
    if accelerator.scaler is not None:
        write_state(folder, GRAD_SCALER_STATE, accelerator.scaler.state_dict())
    if run_identity is not None:
        (folder / RUN_IDENTITY_FILE).write_text(json.dumps(run_identity, indent=2, sort_keys=True) + "\n")
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
    (folder / CHECKPOINT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if not info["weights_are_finite"]:
        logger.warning(
            "Checkpoint of step %d has non-finite weights (%s); rotation keeps the newest finite checkpoint.",
            step,
            f"parameters {', '.join(nonfinite[:5])}{'...' if len(nonfinite) > 5 else ''}"
            if nonfinite
            else "reported by the training loop",
        )


def _check_supported(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"Checkpoints support {_SUPPORTED_TYPES_HINT}, not {accelerator.distributed_type.value}: the optimizer "
            "state would be saved as this rank's shard only."
        )


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf; one device-to-host copy per device."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() or tensor.is_complex():
            flags.setdefault(tensor.device, []).append((name, torch.isfinite(tensor).all()))
    nonfinite = []
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


def _raise_write_error(final: Path, output_dir: Path, error: BaseException | None) -> None:
    if error is not None and not isinstance(error, (OSError, RuntimeError, SafetensorError)):
        raise error  # a programming error (e.g. an optimizer state JSON cannot hold), not a write failure
    try:
        free = _format_bytes(shutil.disk_usage(output_dir).free)
    except OSError:
        free = "an unknown amount of space"
    cause = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write its part"
    raise CheckpointWriteError(
        f"Could not write checkpoint {final} ({cause}). The file system of {output_dir} has {free} free. The "
        "partial checkpoint was removed and earlier checkpoints are untouched: free some space, lower "
        "--save_total_limit or choose another --output_dir, then resume with --resume_from_checkpoint latest."
    ) from error


def _format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so the rename cannot expose files a crash would leave empty."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as stream:
                os.fsync(stream.fileno())
    for directory in [folder, *sorted(path for path in folder.rglob("*") if path.is_dir())]:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Directories cannot be opened for fsync on some platforms (Windows); there the rename is all we can do.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------
# Run identity: what defines the run, recorded in each checkpoint and compared on resume

RUN_IDENTITY_FILE = "run_identity.json"
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
    """What defines a run, as recorded in ``run_identity.json``: ``fixed`` (never changes on resume) and
    ``changeable`` (changes only with ``--resume_allow_changes``), flattened to ``name: JSON value``.

    Args:
        model_config: the trained model's ``config.to_dict()``; its keys whose last part is in
            ``changeable_config_keys`` (drop path, dropout, ...) are changeable, the rest fixed.
        frozen_model: the tokenizer or teacher: e.g. ``{"tokenizer": "/p", "tokenizer weights": fingerprint}``.
        fixed, changeable: the run's other settings (seed; batch size, accumulation, mask settings, precision).
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
    """Compare ``identity`` with the one recorded in ``checkpoint``, before anything changes. Returns the accepted
    changes ``{name: {"saved": ..., "now": ...}}`` (only with ``allow_changes``).

    Raises:
        ValueError: a fixed setting differs, or a changeable one does without ``allow_changes``; one message naming
            every difference.
    """
    if checkpoint is None:
        return {}
    path = Path(checkpoint) / RUN_IDENTITY_FILE
    if not path.is_file():
        logger.warning("Cannot check the run identity of %s (written before run identity was recorded).", checkpoint)
        return {}
    saved, problem = _read_json(path)
    if problem or not isinstance(saved, dict):
        raise CheckpointReadError(f"Cannot resume from {checkpoint}: {problem or f'{path} is not a JSON object'}.")

    def differences(part: str) -> dict[str, dict[str, Any]]:
        before, now = saved.get(part, {}), identity[part]
        return {
            key: {"saved": before.get(key), "now": now.get(key)}
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)
        }

    fixed, changeable = differences("fixed"), differences("changeable")

    def describe(changes: dict[str, dict[str, Any]]) -> str:
        return "; ".join(f"{key} saved {value['saved']!r}, now {value['now']!r}" for key, value in changes.items())

    parts = []
    if fixed:
        parts.append(f"Fixed (start a new run to change them): {describe(fixed)}.")
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


# The native feature-extraction export run_mim.py writes beside its model (`loop.export_feature_extractor`).
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
    file by file (the previous one waits in ``.old-export`` until the new one is in place).

    Raises:
        ExportWriteError: the write failed (a full disk); it names the folder and its free space, the temporary
            folder is removed and the previous export is untouched.
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
        try:
            free = _format_bytes(shutil.disk_usage(output_dir).free)
        except OSError:
            free = "an unknown amount of space"
        remedy = (
            f"the final checkpoint {final_checkpoint} holds the same weights: free some space and run again with "
            "--resume_from_checkpoint latest to export it (nothing is retrained)"
            if final_checkpoint is not None
            else "free some space and run again"
        )
        raise ExportWriteError(
            f"Could not write the final model to {output_dir} ({type(error).__name__}: {error}). The file system of "
            f"{output_dir} has {free} free. The previous export in {output_dir}, if any, is untouched; {remedy}."
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
    if previous.is_dir():
        if (
            not (output_dir / "model.safetensors").is_file()
            and not (output_dir / "model.safetensors.index.json").is_file()
        ):
            for path in previous.iterdir():
                if not (output_dir / path.name).exists():
                    os.replace(path, output_dir / path.name)
        shutil.rmtree(previous, ignore_errors=True)


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
    """Restore the model, optimizer, scheduler (and fp16 grad scaler) saved by :func:`save_checkpoint`.

    Every rank calls it, with what ``accelerator.prepare`` returned. The RNG states are restored separately by
    :func:`restore_rng_states`, after the data-loader iterator exists.

    Returns:
        This rank's ``(loop_state, dataloader_state)`` as they were given to :func:`save_checkpoint`.

    Raises:
        ValueError: another process count, DeepSpeed mismatch, weights that do not fit the model, or a DeepSpeed
            engine file holding a Python object outside ``DEEPSPEED_SAFE_GLOBALS``.
    """
    _check_supported(accelerator)
    checkpoint = Path(checkpoint)
    info = check_resumable(accelerator, checkpoint)
    if not info["weights_are_finite"] and accelerator.is_main_process:
        _warn_nonfinite_resume(checkpoint, info)
    if info["deepspeed"]:
        load_deepspeed_engine(model, checkpoint / DEEPSPEED_FOLDER)
    else:
        _load_model_weights(accelerator.unwrap_model(model), checkpoint)
        optimizer.load_state_dict(read_state(checkpoint, OPTIMIZER_STATE))
    scheduler.load_state_dict(read_state(checkpoint, SCHEDULER_STATE))
    _load_grad_scaler(accelerator, checkpoint)
    state = read_state(checkpoint, TRAINING_STATE.format(rank=accelerator.process_index))
    return state["loop"], state["dataloader"]


def _warn_nonfinite_resume(checkpoint: Path, info: dict[str, Any]) -> None:
    earlier = [path for path in list_checkpoints(checkpoint.parent) if checkpoint_step(path) < info["step"]]
    finite = [path for path in earlier if has_finite_weights(path)]
    why = (
        f"{len(info['nonfinite_parameters'])} parameter(s) hold NaN/inf ({', '.join(info['nonfinite_parameters'][:5])})"
        if info["nonfinite_parameters"]
        else "the run that saved it stopped on non-finite losses or gradients (its weights themselves are finite)"
    )
    alternative = (
        f"To resume from the newest finite weights instead, pass --resume_from_checkpoint {finite[-1]}."
        if finite
        else "No earlier checkpoint with finite weights exists in this folder."
    )
    logger.warning(
        "\n%s\nRESUMING FROM A NON-FINITE CHECKPOINT: %s: %s. %s\n%s", "!" * 80, checkpoint, why, alternative, "!" * 80
    )


def _load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load ``model.safetensors`` (or its shards) into ``model`` exactly; tied copies come back through the tie."""
    index_file = checkpoint / "model.safetensors.index.json"
    if (checkpoint / "model.safetensors").is_file():
        files = [checkpoint / "model.safetensors"]
    elif index_file.is_file():
        files = [checkpoint / name for name in sorted(set(json.loads(index_file.read_text())["weight_map"].values()))]
    else:
        raise ValueError(f"{checkpoint} holds no model.safetensors (nor a sharded index).")
    saved: dict[str, torch.Tensor] = {}
    for file in files:
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


def _load_grad_scaler(accelerator: Accelerator, checkpoint: Path) -> None:
    saved = (checkpoint / f"{GRAD_SCALER_STATE}.json").is_file()
    if accelerator.scaler is not None and saved:
        accelerator.scaler.load_state_dict(read_state(checkpoint, GRAD_SCALER_STATE))
    elif accelerator.scaler is not None:
        logger.info("%s has no fp16 loss-scaler state (saved without fp16): the loss scale starts afresh.", checkpoint)
    # A saved scale without a scaler now is fine: switching fp16 to bf16 is the usual cure for non-finite losses.


def restore_rng_states(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore this rank's python ``random``, numpy and torch (CPU and CUDA) random states from ``checkpoint``.

    Separate from :func:`load_checkpoint` because the loop must create its DataLoader iterator (which draws from the
    torch RNG) first: a resumed run then continues the uninterrupted run's random stream exactly. CUDA states are
    restored on every device when the device count is the one at save time; otherwise only the device this rank
    uses gets the state its rank's device had.
    """
    state_name = RNG_STATE.format(rank=accelerator.process_index)
    if not (Path(checkpoint) / f"{state_name}.json").is_file():
        raise CheckpointReadError(f"{Path(checkpoint) / state_name}.json is missing: the checkpoint is incomplete.")
    set_rng_states(read_state(Path(checkpoint), state_name))


# ---------------------------------------------------------------------------------------------------------------------
# The output folder: listing, resolving, setting aside, rotation

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "metrics.jsonl"
TEMPORARY_PREFIX = ".tmp-"
ABANDONED_PREFIX = "abandoned-"
CHECKPOINT_INFO_FILE = "checkpoint.json"
TRAINING_STATE = "training_state_rank{rank}"
FORMAT_VERSION = 1


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first.

    Temporary folders of interrupted saves (``.tmp-checkpoint-N``) and moved-aside branches (``abandoned-*``) are
    not listed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start.

    Args:
        resume_from_checkpoint: None (fresh run), ``"latest"`` (the newest checkpoint in ``output_dir``, whether its
            weights are finite or not, see the module docstring; None with an info line when there is none) or the
            path of a checkpoint folder.
        output_dir: the run's output folder.

    Raises:
        ValueError: the path is not a checkpoint folder written by this module.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if (path / CHECKPOINT_INFO_FILE).is_file():
        raise_unless_intact(path)  # names every bad file and the newest intact checkpoint
    read_checkpoint_info(path)  # raises a ValueError naming what is wrong with the folder
    return path


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-{step}`` folder, or None for any other name."""
    match = re.fullmatch(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)", path.name)
    return int(match.group(1)) if match else None


def read_checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint.json`` of a checkpoint folder, with a clear error for anything that is not one.

    Raises:
        ValueError: the folder does not exist, has no ``checkpoint.json``,
            or was written in another format version.
    """
    info_file = Path(checkpoint) / CHECKPOINT_INFO_FILE
    if not info_file.is_file():
        if not Path(checkpoint).is_dir():
            raise ValueError(f"Checkpoint folder {checkpoint} does not exist.")
        raise ValueError(f"{checkpoint} is not a checkpoint folder: it has no {CHECKPOINT_INFO_FILE}.")
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointReadError(f"{info_file} is not valid JSON ({error}).") from error
    if not isinstance(info, dict):
        raise CheckpointReadError(f"{info_file} holds a {type(info).__name__}, not a JSON object.")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{checkpoint} has checkpoint format version {info.get('format_version')!r}; this code reads version "
            f"{FORMAT_VERSION}."
        )
    return info


def check_resumable(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's info after checking it belongs to this process count and distributed setup.

    Raises:
        CheckpointReadError: a file of the checkpoint is missing, cut short or malformed (see
            :func:`validate_checkpoint`).
        ValueError: another process count, a missing per-rank state file, or DeepSpeed on one side only.
    """
    try:  # another process count first: a checkpoint of 2 ranks read by 1 lacks nothing, it belongs elsewhere
        info = read_checkpoint_info(checkpoint)
    except ValueError:
        info = {}
    if not (_has_type(info.get("num_processes"), int) and info["num_processes"] != accelerator.num_processes):
        raise_unless_intact(checkpoint)
        info = read_checkpoint_info(checkpoint)
    if info["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was written by {info['num_processes']} processes but {accelerator.num_processes} are "
            "running: the data streams, RNG states and total batch size belong to that process count; resume with "
            "the same number."
        )
    state_file = Path(checkpoint) / f"{TRAINING_STATE.format(rank=accelerator.process_index)}.json"
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing: the checkpoint is incomplete (was it copied partially?).")
    uses_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if info["deepspeed"] != uses_deepspeed:
        written, running = ("with", "without") if info["deepspeed"] else ("without", "with")
        raise ValueError(
            f"{checkpoint} was written {written} DeepSpeed but this run is {running} it: the optimizer state is "
            f"stored {'by the DeepSpeed engine' if info['deepspeed'] else 'unpartitioned'}; resume it the same way, "
            f"or start from its weights (from_pretrained on {checkpoint})."
        )
    return info


# ---------------------------------------------------------------------------------------------------------------
# The output folder before training


def prepare_output_dir(accelerator: Accelerator, output_dir: str | Path, checkpoint: Path | None) -> None:
    """Make ``output_dir`` ready for a fresh run (``checkpoint`` None) or for resuming from ``checkpoint``.

    Every rank calls it, before training. It

    * refuses a fresh run in a folder that holds checkpoints: rotation and ``latest`` go by step number, so a fresh
      run there would rotate away its own checkpoints and a later ``latest`` would resume the old run;
    * checks that ``checkpoint`` can be resumed by this run (process count, DeepSpeed or not) before changing
      anything;
    * removes temporary folders of interrupted saves;
    * when resuming from step K: moves checkpoints of steps after K (an abandoned branch) and the ``metrics.jsonl``
      records after step K (including a line cut short by a kill) into ``output_dir/abandoned-<UTC time>/`` with a
      warning naming them; a fresh run moves an old ``metrics.jsonl`` there too. Nothing is deleted.

    Raises:
        ValueError: a fresh run over checkpoints, or a checkpoint this run cannot resume.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        if earlier := list_checkpoints(output_dir):
            raise ValueError(
                f"{output_dir} holds checkpoints of an earlier run ({', '.join(path.name for path in earlier)}): "
                "pass --resume_from_checkpoint latest to continue it, or use another --output_dir (or delete them)."
            )
        resumed_step = None
    else:
        resumed_step = check_resumable(accelerator, checkpoint)["step"]
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes the folder
    if accelerator.is_main_process:
        for interrupted in output_dir.glob(f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(interrupted, ignore_errors=True)
        _recover_export(output_dir)
        _set_aside_abandoned(output_dir, resumed_step, checkpoint)
    accelerator.wait_for_everyone()  # no rank writes into the folder before it is ready


def _set_aside_abandoned(output_dir: Path, resumed_step: int | None, checkpoint: Path | None) -> None:
    """Move checkpoints after ``resumed_step`` and the metrics records after it (all of them for a fresh run)."""
    later = []
    if resumed_step is not None:
        resumed = checkpoint.resolve()
        later = [
            path
            for path in list_checkpoints(output_dir)
            if checkpoint_step(path) > resumed_step and path.resolve() != resumed
        ]
    metrics_file = output_dir / METRICS_FILE
    kept, dropped = _split_metrics(metrics_file, resumed_step)
    if not later and not dropped:
        return
    folder = _new_abandoned_folder(output_dir)
    for path in later:
        os.replace(path, folder / path.name)
    # An export is written only at a run's last step, after its last checkpoint: with later checkpoints set aside,
    # the export at the top belongs to the abandoned branch too.
    exported = export_files(output_dir) if later else []
    for path in exported:
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
    else:
        logger.warning(
            "Resuming from step %d abandons what was saved after it: moved %s and %d %s record(s) after step %d "
            "to %s.",
            resumed_step,
            ", ".join(path.name for path in later)
            + (f" and the final export ({', '.join(path.name for path in exported)})" if exported else "")
            if later
            else "no checkpoint",
            len(dropped),
            METRICS_FILE,
            resumed_step,
            folder,
        )


def _split_metrics(metrics_file: Path, step: int | None) -> tuple[list[str], list[str]]:
    """Lines of ``metrics.jsonl`` kept by a run resuming at ``step`` and the lines it drops (all for None)."""
    if not metrics_file.is_file():
        return [], []
    kept, dropped = [], []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
            belongs = step is not None and record.get("step", step) <= step
        except (json.JSONDecodeError, AttributeError, TypeError):  # e.g. a line cut short by a kill
            belongs = False
        (kept if belongs else dropped).append(line)
    return kept, dropped


def _new_abandoned_folder(output_dir: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        folder = output_dir / f"{ABANDONED_PREFIX}{stamp}{f'-{attempt}' if attempt else ''}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # two resumes within one second
            continue
    raise FileExistsError(f"Could not create a new {ABANDONED_PREFIX}{stamp}-N folder in {output_dir}.")


# ---------------------------------------------------------------------------------------------------------------
# Rotation


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None, newest: Path) -> None:
    """Delete all but the newest ``save_total_limit`` checkpoints, never the newest one with finite weights."""
    if save_total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    keep = {newest, *checkpoints[-save_total_limit:]}
    finite = [path for path in checkpoints if has_finite_weights(path)]
    if finite:
        keep.add(finite[-1])
    for old in checkpoints:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def last_finite_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``output_dir`` whose ``checkpoint.json`` vouches for finite weights, or None."""
    finite = [path for path in list_checkpoints(output_dir) if has_finite_weights(path)]
    return finite[-1] if finite else None


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
    try:
        return bool(read_checkpoint_info(checkpoint)["weights_are_finite"])
    except (ValueError, KeyError, OSError):  # not one of ours: nothing vouches for its weights
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Validation: every file a resume reads, checked before anything is loaded or the output folder changes


class CheckpointReadError(ValueError):
    """A checkpoint file is missing, cut short or malformed; the message names the file and what is wrong."""


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
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _has_type(value: Any, kind: type) -> bool:
    return isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)


def _safetensors_names(path: Path) -> tuple[set[str] | None, str | None]:
    """The tensor names in a safetensors file's header, or the problem with the file (header only, no tensor read)."""
    if not path.is_file():
        return None, f"{path} is missing"
    size = path.stat().st_size
    if size == 0:
        return None, f"{path} is empty"
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return None, f"{path} is truncated ({size} bytes, not even a safetensors header)"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return None, (
                f"{path} is corrupt or truncated: not a safetensors file whose header fits (the header claims "
                f"{length} bytes, the file has {size})"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, stop = entry["data_offsets"]
            count = 1
            for dimension in entry["shape"]:
                count *= dimension
            if not 0 <= begin <= stop or stop - begin != count * _SAFETENSORS_ITEMSIZE[entry["dtype"]]:
                raise ValueError(f"bad offsets for {name}")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        return None, f"{path} is corrupt: not a safetensors file (invalid header: {error})"
    if end != size - 8 - length:
        return (
            None,
            f"{path} is truncated or corrupt (its header describes {end} bytes of data, the file holds {size - 8 - length})",
        )
    return {name for name in header if name != "__metadata__"}, None


def _read_json(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        return json.loads(path.read_text()), None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"


def _tensor_references(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_tensor_references(item) for item in value)) if value else set()
    if isinstance(value, dict):
        if len(value) == 1 and "__tensor__" in value:
            return {str(value["__tensor__"])}
        return set().union(*(_tensor_references(item) for item in value.values())) if value else set()
    return set()


def _state_problems(folder: Path, stem: str) -> tuple[Any, list[str]]:
    """A :func:`write_state` pair: the JSON parses and every tensor it refers to is in the sibling safetensors."""
    encoded, problem = _read_json(folder / f"{stem}.json")
    if problem:
        return None, [problem]
    references = _tensor_references(encoded)
    tensor_file = folder / f"{stem}.safetensors"
    if not references:
        return encoded, []
    if not tensor_file.is_file():
        return None, [f"{tensor_file} is missing ({stem}.json refers to {len(references)} tensors in it)"]
    names, problem = _safetensors_names(tensor_file)
    if problem:
        return None, [problem]
    if lacking := sorted(references - names):
        return None, [
            f"{tensor_file} lacks {len(lacking)} tensors that {stem}.json refers to ({', '.join(lacking[:3])})"
        ]
    return encoded, []


def validate_checkpoint(checkpoint: str | Path) -> list[str]:
    """Every problem with the files a resume from ``checkpoint`` reads, each "<file> <what is wrong>"; empty when it
    is intact. Reads JSON and safetensors headers only (no tensor), applies nothing, and needs no collective: every
    rank reaches the same verdict on the shared folder.

    Checked: ``checkpoint.json`` (JSON, field types, its step equals the folder's), the weights (``model.safetensors``
    or the index and its shards) unless DeepSpeed holds them, ``optimizer``, ``scheduler``, ``grad_scaler`` (when
    saved), and ``training_state_rank{r}`` / ``rng_state_rank{r}`` of every rank the checkpoint was written by (the
    loop step equals the folder's).
    """
    checkpoint = Path(checkpoint)
    folder_step = checkpoint_step(checkpoint)
    info_file = checkpoint / CHECKPOINT_INFO_FILE
    info, problem = _read_json(info_file)
    if problem:
        return [problem]
    if not isinstance(info, dict):
        return [f"{info_file} holds a {type(info).__name__}, not a JSON object"]
    problems = [
        f"{info_file}: {key} is {info[key]!r} ({type(info[key]).__name__}), not {kind.__name__}"
        for key, kind in _INFO_TYPES.items()
        if key in info and not _has_type(info[key], kind)
    ]
    problems += [
        f"{info_file}: {key} is missing"
        for key in ("format_version", "step", "num_processes", "deepspeed")
        if key not in info
    ]
    if problems:
        return problems
    if folder_step is not None and info["step"] != folder_step:
        problems.append(f"{info_file}: step {info['step']} disagrees with the folder name {checkpoint.name}")
    if not info["deepspeed"]:
        index_file = checkpoint / "model.safetensors.index.json"
        if (checkpoint / "model.safetensors").is_file() or not index_file.is_file():
            problems += [p for p in [_safetensors_names(checkpoint / "model.safetensors")[1]] if p]
        else:
            index, problem = _read_json(index_file)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if problem or not isinstance(weight_map, dict):
                problems.append(problem or f"{index_file} has no weight_map object")
            else:
                for name in sorted(set(map(str, weight_map.values()))):
                    problems += [p for p in [_safetensors_names(checkpoint / name)[1]] if p]
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


def newest_intact_checkpoint(output_dir: str | Path, *, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint in ``output_dir`` (other than ``exclude``) that :func:`validate_checkpoint` accepts."""
    for candidate in reversed(list_checkpoints(output_dir)):
        if (exclude is None or candidate.resolve() != Path(exclude).resolve()) and not validate_checkpoint(candidate):
            return candidate
    return None


def raise_unless_intact(checkpoint: str | Path) -> None:
    """Raise one :class:`CheckpointReadError` naming every bad file of ``checkpoint`` and the newest intact checkpoint
    beside it, when :func:`validate_checkpoint` finds a problem.
    """
    checkpoint = Path(checkpoint)
    problems = validate_checkpoint(checkpoint)
    if not problems:
        return
    intact = newest_intact_checkpoint(checkpoint.parent, exclude=checkpoint)
    if intact is None:
        advice = f"No intact checkpoint in {checkpoint.parent}."
    else:
        finite = "" if has_finite_weights(intact) else " (its weights are not finite)"
        advice = (
            f"The newest intact checkpoint is {intact}{finite}: pass --resume_from_checkpoint {intact} (what was "
            f"trained after it is set aside), or delete {checkpoint.name}."
        )
    raise CheckpointReadError(f"Cannot resume from {checkpoint}: {'; '.join(problems)}. {advice}")


# ---------------------------------------------------------------------------------------------------------------------
# State dicts as JSON + safetensors, no pickle

# The keys that mark a tagged value (see the module docstring); a dict holding one is stored as items.
_TAGS = ("__tensor__", "__tuple__", "__items__")


def write_state(folder: Path, stem: str, state: Any) -> None:
    """Write ``state`` as ``folder/{stem}.json``, plus ``folder/{stem}.safetensors`` when it holds tensors.

    Raises:
        TypeError: ``state`` holds something other than tensors, numbers, strings, None, lists, tuples and dicts.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, stem)
    if tensors:
        save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(encoded))


def read_state(folder: Path, stem: str) -> Any:
    """What :func:`write_state` wrote; tensors come back on the CPU (``load_state_dict`` moves them)."""
    encoded = json.loads((folder / f"{stem}.json").read_text())
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return _decode(encoded, tensors)


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


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if len(value) == 1 and "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if len(value) == 1 and "__items__" in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["__items__"]}
    return {key: _decode(item, tensors) for key, item in value.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Random states

logger = logging.getLogger(__name__)


def capture_rng_states() -> dict[str, Any]:
    """This process's random states: ``python`` and ``numpy`` (tuples and lists), ``torch`` (a CPU tensor),
    ``cuda`` (one tensor per visible device, None without CUDA) and ``cuda_device`` (the current device)."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, key.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": None,
        "cuda_device": None,
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
        states["cuda_device"] = torch.cuda.current_device()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set this process's random states to ``states`` (from :func:`capture_rng_states`, possibly read back from a file).

    CUDA states are set on every device when the device count is the one at capture time; otherwise only the current
    device gets the state the capturing process's current device had.
    """
    random.setstate(states["python"])
    kind, key, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    saved_cuda = states["cuda"]
    if saved_cuda is None or not torch.cuda.is_available():
        if saved_cuda is not None or torch.cuda.is_available():
            logger.warning("CUDA random states are not restored: the checkpoint and this run differ in using CUDA.")
        return
    if len(saved_cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved_cuda)
    else:
        logger.warning(
            "The checkpoint saw %d CUDA devices per process, this run sees %d: only the current device's random "
            "state is restored.",
            len(saved_cuda),
            torch.cuda.device_count(),
        )
        torch.cuda.set_rng_state(saved_cuda[states["cuda_device"]], device=torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed engine checkpoints, read without unpickling code

# The tag (sub-folder) of the engine checkpoint inside a checkpoint's deepspeed/ folder.
DEEPSPEED_TAG = "engine"

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


@contextlib.contextmanager
def _weights_only_engine_loads(engine: Any) -> Iterator[None]:
    """Make the DeepSpeed engine read its checkpoint files with ``weights_only=True``.

    DeepSpeed's checkpoint engines read ``torch.save`` files with ``torch.load`` (``TorchCheckpointEngine`` with
    ``weights_only=False``) and offer no switch, so ``load`` is replaced on this engine's instance for the duration.
    """
    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine).__name__ not in _TORCH_FORMAT_ENGINES:
        raise ValueError(
            f"DeepSpeed's checkpoint engine is {type(checkpoint_engine).__name__}; resuming supports the engines that "
            f"write torch.save files ({', '.join(sorted(_TORCH_FORMAT_ENGINES))}), which can be read without "
            "unpickling code."
        )
    allowed = [_import_object(name) for name in DEEPSPEED_SAFE_GLOBALS]

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
        yield
    finally:
        del checkpoint_engine.load  # the class's method again


def load_deepspeed_engine(engine: Any, folder: Path) -> None:
    """Load the model and (partitioned) optimizer of ``engine`` (a DeepSpeed engine, as ``accelerator.prepare``
    returned it) from ``folder``, in DeepSpeed's own format, without running code.

    Raises:
        ValueError: the checkpoint engine does not write ``torch.save`` files, a file holds a Python object outside
            :data:`DEEPSPEED_SAFE_GLOBALS`, or ``folder`` holds no engine checkpoint.
    """
    with _weights_only_engine_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_module_strict=True, load_lr_scheduler_states=False
        )
    if load_path is None:
        raise ValueError(f"DeepSpeed found no engine checkpoint in {folder}.")


def _import_object(qualified_name: str) -> Any:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)
