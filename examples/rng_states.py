"""This process's random states (python ``random``, numpy, torch CPU and CUDA) as a value, and setting them back.

:func:`capture_rng_states` returns what :func:`state_files.write_state` can store; :func:`set_rng_states` restores
it, so that a resumed run continues the uninterrupted run's random stream exactly.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

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
