"""The output folder of a training run: which checkpoints it holds, which one to resume, and getting it ready.

A checkpoint is a complete folder ``output_dir/checkpoint-{step}`` with a ``checkpoint.json`` (written by
:func:`checkpointing.save_checkpoint`); ``.tmp-checkpoint-{step}`` folders are saves that were interrupted and
``abandoned-<UTC time>/`` folders hold what a rewind set aside. This module finds and validates checkpoints
(:func:`list_checkpoints`, :func:`resolve_checkpoint`), makes the folder ready before training
(:func:`prepare_output_dir`: refuse to mix runs, clear interrupted saves, move an abandoned branch and its
``metrics.jsonl`` records aside) and rotates old checkpoints while keeping the newest finite one
(:func:`rotate_checkpoints`). It reads only ``checkpoint.json`` files and never loads weights.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

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
    read_checkpoint_info(path)  # raises a ValueError naming what is wrong with the folder
    return path


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-{step}`` folder, or None for any other name."""
    match = re.fullmatch(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)", path.name)
    return int(match.group(1)) if match else None


def read_checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint.json`` of a checkpoint folder, with a clear error for anything that is not one.

    Raises:
        ValueError: the folder does not exist, has no ``checkpoint.json`` (e.g. an older pickle-based checkpoint),
            or was written in another format version.
    """
    info_file = Path(checkpoint) / CHECKPOINT_INFO_FILE
    if not info_file.is_file():
        if not Path(checkpoint).is_dir():
            raise ValueError(f"Checkpoint folder {checkpoint} does not exist.")
        legacy = any(Path(checkpoint).glob("*.pkl")) or (Path(checkpoint) / "optimizer.bin").exists()
        hint = (
            " It looks like a checkpoint of an earlier version (Accelerate's pickle files), which is no longer "
            "loaded because unpickling can execute code; start from its model weights with --model_name_or_path."
            if legacy
            else ""
        )
        raise ValueError(f"{checkpoint} is not a checkpoint folder: it has no {CHECKPOINT_INFO_FILE}.{hint}")
    info = json.loads(info_file.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{checkpoint} has checkpoint format version {info.get('format_version')!r}; this code reads version "
            f"{FORMAT_VERSION}."
        )
    return info


def check_resumable(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's info after checking it belongs to this process count and distributed setup.

    Raises:
        ValueError: another process count, a missing per-rank state file, or DeepSpeed on one side only.
    """
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
            ", ".join(path.name for path in later) if later else "no checkpoint",
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


def has_finite_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint.json`` vouches for finite weights (False for a folder that is not a checkpoint)."""
    try:
        return bool(read_checkpoint_info(checkpoint)["weights_are_finite"])
    except (ValueError, KeyError, OSError):  # not one of ours: nothing vouches for its weights
        return False
