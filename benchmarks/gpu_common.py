"""The shared setting of bench_gpu.py's sections: paths, the sizes of a run, its context, and its test images.

Importing it puts the repository root on ``sys.path`` (so that ``python benchmarks/bench_gpu.py`` finds
``modeling_beitv2`` and ``processing`` without the package installed); every sibling module imports it before
``modeling_beitv2``. :class:`Sizes` says what a run measures (:data:`FULL` on a GPU, :data:`QUICK` on a CPU),
:class:`Bench` is what every section receives, and :func:`write_jpegs` makes the photo-like JPEGs the input
pipeline and the training scripts read.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import multiprocessing
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_results import Results
from PIL import Image

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
EXAMPLES_DIR = ROOT / "examples"
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_gpu.py` without the package installed
    sys.path.insert(0, str(ROOT))

SECTIONS = ("mim", "tokenizer", "official", "pipeline", "scripts")

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the GPU table's sizes (`FULL`) or the tiny CPU check's (`QUICK`)."""

    batch_size: int
    image_size: int
    patch_size: int
    mim_preset: str
    mim_overrides: dict[str, Any]
    num_masked_patches: int  # per image, as the blockwise mask generator gives with --num_masking_patches
    tiny_tokenizer: bool  # False: VQ-KD base-decoder3; True: a 2-layer, 32-wide one
    warmup_steps: int  # the first one also compiles; >= 1
    timed_steps: int
    peak_matmul_size: int
    num_images: int
    pipeline_seconds: float
    script_steps: int
    script_logging_steps: int
    precisions: tuple[str, ...]
    compile_backend: str
    time_budget_s: float
    section_timeouts: dict[str, float]


FULL = Sizes(
    batch_size=128,
    image_size=224,
    patch_size=16,
    mim_preset="base",
    mim_overrides={},
    num_masked_patches=75,
    tiny_tokenizer=False,
    warmup_steps=3,
    timed_steps=10,
    peak_matmul_size=8192,
    num_images=3000,
    pipeline_seconds=6.0,
    script_steps=30,
    script_logging_steps=10,
    precisions=("bf16",),
    compile_backend="inductor",
    # About 8 minutes: the GPU session has 15 minutes of device time, start-up included.
    time_budget_s=480.0,
    section_timeouts={"mim": 170.0, "tokenizer": 60.0, "official": 40.0, "pipeline": 40.0, "scripts": 240.0},
)
QUICK = Sizes(
    batch_size=4,
    image_size=32,
    patch_size=8,
    mim_preset="tiny",
    mim_overrides={**TINY_VIT, "patch_size": 8, "early_layers": 1, "head_layers": 1},
    num_masked_patches=6,
    tiny_tokenizer=True,
    warmup_steps=1,
    timed_steps=2,
    peak_matmul_size=256,
    num_images=12,
    pipeline_seconds=1.0,
    script_steps=3,
    script_logging_steps=1,
    precisions=("fp32", "bf16"),
    # Dynamo's tracing (graph breaks included) without Inductor's C++ compilation, which takes minutes on 2 cores.
    compile_backend="eager",
    time_budget_s=400.0,
    section_timeouts=dict.fromkeys(SECTIONS, 150.0),
)


class SectionTimeout(BaseException):
    """A section ran past its time limit. A BaseException, so that per-measurement `except Exception` handlers inside
    the section record errors without swallowing it."""


class SectionSkipped(Exception):
    """A section that cannot run here (missing input or dependency); its message says why and what to do."""


@dataclasses.dataclass
class Bench:
    """What every section gets: options, sizes, device, the results and the working folder."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    results: Results
    work_dir: Path
    peak_flops: float | None = None
    section_deadline: float = math.inf  # time.monotonic() at which the running section is cut off
    _images_dir: Path | None = None

    def remaining_s(self) -> float:
        return self.section_deadline - time.monotonic()

    def mfu(self, flops: float | None, seconds: float | None) -> float | None:
        """Model FLOP utilisation: `flops` done in `seconds`, over the measured bf16 matmul peak."""
        if not flops or not seconds or not self.peak_flops:
            return None
        return flops / seconds / self.peak_flops

    def images_dir(self) -> Path:
        """The folder of generated JPEGs (written on first use)."""
        if self._images_dir is None:
            self._images_dir = write_jpegs(self.work_dir / "images", self.sizes.num_images)
        return self._images_dir


def _write_jpeg_range(folder: Path, start: int, count: int, width: int, height: int) -> None:
    """Photo-like JPEGs (smooth gradients plus noise, quality 90) so that decoding costs what real photos cost."""
    xs, ys = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rng = np.random.default_rng(start)
    for index in range(start, start + count):
        phase = rng.uniform(0, 6)
        base = np.stack([xs, ys, 0.5 * (np.sin(8 * xs + phase) + 1)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)


def write_jpegs(folder: Path, count: int, width: int = 500, height: int = 375) -> Path:
    """`count` JPEGs of `width` x `height` in `folder` (kept if already there), written by one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    processes = max(1, min(os.cpu_count() or 1, count // 8))
    chunk = math.ceil(count / processes)
    jobs = [(folder, start, min(chunk, count - start), width, height) for start in range(0, count, chunk)]
    if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(_write_jpeg_range, jobs)
    else:
        for job in jobs:
            _write_jpeg_range(*job)
    return folder


def import_examples_module(name: str) -> types.ModuleType:
    """A module of examples/ (which the training scripts import as top-level modules)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)
