"""A numpy random generator that stays independent across processes (DataLoader workers, `datasets.map` workers)."""

from __future__ import annotations

import os

import numpy as np
import torch


class ProcessLocalRNG:
    """
    Owns a `numpy.random.Generator` and re-derives it once in every new process that uses it.

    A generator copied into DataLoader workers (by fork or by pickling) would otherwise replay the same random
    stream in every worker and in every epoch. On first use in a new process the generator is reseeded from
    `[a draw from the inherited generator, process entropy]`, where the process entropy is the worker seed PyTorch
    gives each DataLoader worker (`base_seed + worker_id`, with `base_seed` drawn anew each epoch from the parent's
    torch RNG) or the process id outside DataLoader workers. So with a fixed `seed` and a fixed `torch.manual_seed`
    (or DataLoader `generator`), every worker gets its own stream and reruns reproduce it exactly.

    Args:
        seed (`int`, `numpy.random.Generator` or `None`):
            Seed of the generator, an existing generator to use (not copied), or `None` for fresh OS entropy.
    """

    def __init__(self, seed: int | np.random.Generator | None = None):
        if seed is not None and not isinstance(seed, (int, np.integer, np.random.Generator)):
            raise ValueError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}: {seed!r}")
        self._generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._pid = os.getpid()

    @property
    def generator(self) -> np.random.Generator:
        pid = os.getpid()
        if pid != self._pid:
            worker_info = torch.utils.data.get_worker_info()
            process_entropy = worker_info.seed if worker_info is not None else pid
            inherited = int(self._generator.integers(2**63))
            self._generator = np.random.default_rng([inherited, process_entropy])
            self._pid = pid
        return self._generator
