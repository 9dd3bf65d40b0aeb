"""Reading DeepSpeed engine checkpoints without unpickling code.

Under DeepSpeed the engine (model shards, ZeRO-partitioned optimizer) keeps its own ``torch.save`` format, in the
``deepspeed/`` folder of a checkpoint (see :mod:`checkpointing`). DeepSpeed reads those files with
``torch.load(weights_only=False)``; :func:`load_deepspeed_engine` makes it read them with ``weights_only=True``, with
only the few DeepSpeed classes of :data:`DEEPSPEED_SAFE_GLOBALS` allowed, so that a planted pickle raises instead of
running.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

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
                f"it to deepspeed_checkpoints.DEEPSPEED_SAFE_GLOBALS. {exc}"
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
