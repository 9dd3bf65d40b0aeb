#!/usr/bin/env python
"""Measure the BEiT v2 pretraining stack on one CUDA GPU, in one command, and write the table of the results.

    python benchmarks/bench_gpu.py [--official_beit2_dir PATH] [--output benchmarks/results_gpu.md]
    python benchmarks/bench_gpu.py --quick      # tiny sizes on the CPU (~1 min): checks that every section runs

It writes a markdown table (`benchmarks/results_gpu.md` by default) and a JSON file next to it (same name, `.json`),
both rewritten after every measurement, so a run cut short keeps what it measured. Sections, in the order they run
(choose some with `--sections`):

* ``mim``: one MIM training step (forward, backward, fused AdamW) under bf16 autocast: ours with patch aggregation on
  and off, for every attention implementation the model offers, eager and `torch.compile`d (compile time reported
  apart, with the number of graphs Dynamo made), with the static masked count (`num_masked_patches=`) when the
  model's forward accepts it; transformers' `BeitForMaskedImageModeling` in the same process.
* ``tokenizer``: the frozen VQ-KD base-decoder3 `get_codebook_indices`, as run_mim.py calls it, in fp32, fp32 with
  TF32 matmuls, bf16 and fp16 autocast, and compiled under bf16 autocast; with the fraction of codes equal to fp32's
  (random weights, random unit codebook).
* ``official``: with `--official_beit2_dir` (a checkout of microsoft/unilm's ``beit2/``, imported from there, never
  copied here; needs timm and einops), the official `VisionTransformerForMaskedImageModelingCLS` step and the official
  VQKD tokenizer under fp16 autocast, as its training engine calls it.
* ``pipeline``: `BeitV2ImageProcessor` + collation through the project's data path (examples/image_datasets.py) with
  `os.cpu_count() - 2` DataLoader workers and with 1, on 500x375 JPEGs it writes itself.
* ``scripts``: examples/run_mim.py and run_vqkd.py end to end as subprocesses on those JPEGs (a random VQ-KD
  tokenizer / a random CLIP-B/16 teacher saved first), read back from their metrics.jsonl, first window skipped.

Every measurement: warm-up steps, then timed steps (CUDA events on a GPU), the median; peak memory with
`torch.cuda.max_memory_allocated`; FLOPs of one step with `torch.utils.flop_counter.FlopCounterMode`; MFU = FLOP/s
over the bf16 matmul peak measured at start in the same process (an 8192^3 matmul). Each section has a time limit
(`--section_timeouts`) and the whole run a budget (`--time_budget_s`, default 480 s); a section that fails or runs
out of time is recorded as such and the next one runs. Without a GPU the full sizes would take hours: the script
refuses unless `--quick` is given.

GPU session, in one go. Here, first (wheels the GPU machine lacks, and the official code in an ignored folder)::

    echo /.whl/ >> .git/info/exclude && echo /.official/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0 torchdata==0.11.0 einops==0.8.2
    mkdir -p .official/beit2 && git -C UNILM archive HEAD:beit2 | tar -x -C .official/beit2   # UNILM: a clone

then the device command, with ``carry: [".whl", ".official"]`` and a 600 s limit::

    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \\
      && export PYTHONPATH=$PWD/.site:$PWD \\
      && python3 benchmarks/bench_gpu.py --official_beit2_dir .official/beit2 --output $OUT/results_gpu.md

and copy the returned `results_gpu.md` / `results_gpu.json` into benchmarks/. If the budget is tight, `--compile off`
skips the compiled variants (the slowest part), and `--sections` splits the run in two.

The official `modeling_vqkd.py` imports its training utilities and teacher loaders, which need packages the tokenizer
does not (tensorboardX, torchvision, ftfy, `torch._six`): empty stand-ins replace them while it is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import inspect
import io
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
EXAMPLES_DIR = ROOT / "examples"
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_gpu.py` without the package installed
    sys.path.insert(0, str(ROOT))

import modeling_beitv2  # noqa: E402
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, VQKDConfig, VQKDModel  # noqa: E402
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config  # noqa: E402

SECTIONS = ("mim", "tokenizer", "official", "pipeline", "scripts")
DEFAULT_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The official tokenizer module imports its training utilities (`utils`: tensorboardX, torch._six, gone since
# torch 2.0) and its teacher loaders (`vqkd_teacher`: torchvision, ftfy, downloads). A frozen tokenizer uses neither,
# so empty stand-ins take their place while it is imported.
OFFICIAL_TRAINING_ONLY_MODULES = ("utils", "vqkd_teacher")
# Windows of a script's metrics.jsonl that pay for start-up (first batches, lazy initialisation, compilation).
SCRIPT_WARMUP_WINDOWS = 1
# A section is not started with less than this left of the run's budget.
MIN_SECTION_S = 5.0
# Time kept after a training script for counting its FLOPs (building ViT-B models on the CPU, one step).
SCRIPT_FLOP_COUNT_S = 15.0
GiB = 2**30

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


# ---------------------------------------------------------------------------------------------------------------
# Results: a JSON file and a markdown table, rewritten after every change


@dataclasses.dataclass
class Column:
    header: str
    key: str
    style: str = "auto"  # auto | percent | bool | flags


TABLES: dict[str, tuple[str, list[Column]]] = {
    "mim": (
        "MIM training step (forward, backward, fused AdamW)",
        [
            Column("model", "model"),
            Column("attention", "attention"),
            Column("aggregation", "aggregation", "bool"),
            Column("torch.compile", "compiled", "bool"),
            Column("static count", "static_count", "bool"),
            Column("precision", "precision"),
            Column("images/s", "images_per_s"),
            Column("ms/step", "ms_per_step"),
            Column("GFLOP/image", "gflop_per_image"),
            Column("MFU", "mfu", "percent"),
            Column("peak GiB", "peak_gib"),
            Column("compile s", "compile_s"),
            Column("graphs", "graphs"),
        ],
    ),
    "tokenizer": (
        "Tokenization (`get_codebook_indices` of the frozen tokenizer, as run_mim.py calls it)",
        [
            Column("tokenizer", "model"),
            Column("precision", "precision"),
            Column("torch.compile", "compiled", "bool"),
            Column("images/s", "images_per_s"),
            Column("ms/batch", "ms_per_batch"),
            Column("codes = fp32", "agreement_with_fp32", "percent"),
            Column("GFLOP/image", "gflop_per_image"),
            Column("MFU", "mfu", "percent"),
            Column("peak GiB", "peak_gib"),
            Column("compile s", "compile_s"),
        ],
    ),
    "pipeline": (
        "Input pipeline (`BeitV2ImageProcessor` + collation through examples/image_datasets.py, no model)",
        [
            Column("workers asked", "workers"),
            Column("workers used", "workers_used"),
            Column("shards", "shards"),
            Column("images/s", "images_per_s"),
            Column("images/s per worker", "images_per_s_per_worker"),
            Column("images timed", "images_timed"),
        ],
    ),
    "scripts": (
        "Training scripts end to end (metrics.jsonl, first window skipped)",
        [
            Column("script", "script"),
            Column("images/s", "images_per_s"),
            Column("data wait", "data_wait_fraction", "percent"),
            Column("MFU", "mfu", "percent"),
            Column("GFLOP/image", "gflop_per_image"),
            Column("losses (last window)", "losses"),
            Column("windows", "steady_windows"),
            Column("flags", "flags", "flags"),
            Column("note", "note"),
        ],
    ),
}


def _format(value: Any, style: str = "auto") -> str:
    if value is None:
        return "–"
    if style == "percent" and isinstance(value, (int, float)):
        return f"{100 * value:.1f}%"
    if style == "flags" and isinstance(value, list):
        return f"`{' '.join(value)}`" if value else "–"
    if isinstance(value, bool) or style == "bool":
        return "on" if value else "off"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_format(item)}" for key, item in value.items()) or "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


class Results:
    """Every record and section status of a run; `write()` rewrites the JSON and markdown files atomically."""

    def __init__(self, markdown_path: Path, header: dict[str, Any]) -> None:
        self.markdown_path = markdown_path
        self.json_path = markdown_path.with_suffix(".json")
        self.header = header
        self.sections: dict[str, dict[str, Any]] = {}

    def start(self, section: str) -> None:
        self.sections[section] = {
            "status": "running", "seconds": None, "note": None, "errors": [], "unsupported": [], "records": []
        }  # fmt: skip
        self.write()

    def add(self, section: str, record: dict[str, Any]) -> None:
        self.sections[section]["records"].append(record)
        print(json.dumps({"section": section, **record}), flush=True)
        self.write()

    def add_error(self, section: str, what: str, error: BaseException) -> None:
        """Record a failed measurement; the section goes on with the next one."""
        entry = {"what": what, "error": f"{type(error).__name__}: {error}", "traceback": _traceback_tail(error)}
        self.sections[section]["errors"].append(entry)
        print(f"[{section}] {what} failed: {entry['error']}", file=sys.stderr, flush=True)
        self.write()

    def add_unsupported(self, section: str, what: str, error: NotImplementedError) -> None:
        """Record a measurement this device or PyTorch build cannot run (e.g. FlexAttention's backward on a CPU)."""
        self.sections[section]["unsupported"].append({"what": what, "reason": str(error)})
        print(f"[{section}] {what} not supported here: {error}", file=sys.stderr, flush=True)
        self.write()

    def finish(self, section: str, status: str, seconds: float | None, note: str | None = None) -> None:
        entry = self.sections.setdefault(section, {"errors": [], "records": []})
        if status == "ok" and entry["errors"]:
            status = "partial"
        entry.update(status=status, seconds=None if seconds is None else round(seconds, 1), note=note)
        print(f"[{section}] {status}" + (f" ({seconds:.0f} s)" if seconds else "") + (f": {note}" if note else ""))
        self.write()

    def to_dict(self) -> dict[str, Any]:
        return {**self.header, "sections": self.sections}

    def write(self) -> None:
        self.markdown_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.json_path, json.dumps(self.to_dict(), indent=2, default=str) + "\n"),
            (self.markdown_path, self.markdown()),
        ):
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(text)
            os.replace(temporary, path)

    def markdown(self) -> str:
        header, machine = self.header, self.header["machine"]
        versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
        peak = header.get("peak_tflops")
        sizes = header["sizes"]
        lines = [
            f"# BEiT v2 pretraining stack on {machine['device_name']}",
            "",
            f"`{header['command']}` on {machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPU cores), "
            f"{versions}; project commit {machine['commit'] or 'unknown'}; {machine['date']}.",
            "",
            f"Batch {sizes['batch_size']}, {sizes['image_size']} px images, patch {sizes['patch_size']}, MIM preset "
            f"`{sizes['mim_preset']}` {_format(sizes['mim_overrides'])}, {sizes['num_masked_patches']} masked patches "
            f"per image; {sizes['warmup_steps']} warm-up + {sizes['timed_steps']} timed steps, median"
            f"{' (CUDA events)' if machine['device'] == 'cuda' else ''}. MFU denominator: the bf16 matmul peak measured "
            f"in this process ({sizes['peak_matmul_size']}^3): "
            + (f"{peak:.4g} TFLOP/s." if peak else "not measured.")
            + " GFLOP/image counts one forward + backward (forward only for tokenization) with FlopCounterMode.",
        ]
        if machine["device"] != "cuda":
            lines += ["", "On a CPU, with tiny sizes and one thread, these numbers only show that every section runs."]
        records = [record for section in self.sections.values() for record in section.get("records", [])]
        for table, (title, columns) in TABLES.items():
            rows = [record for record in records if record.get("table") == table]
            if not rows:
                continue
            lines += ["", f"## {title}", "", "| " + " | ".join(column.header for column in columns) + " |"]
            lines.append("|" + "---|" * len(columns))
            for row in rows:
                lines.append(
                    "| " + " | ".join(_format(row.get(column.key), column.style) for column in columns) + " |"
                )
        lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
        for name, section in self.sections.items():
            lines.append(
                f"| {name} | {section.get('status')} | {_format(section.get('seconds'))} | {_format(section.get('note'))} |"
            )
        unsupported = [
            (name, item) for name, section in self.sections.items() for item in section.get("unsupported", [])
        ]
        if unsupported:
            lines += ["", "## Not supported here", ""]
            lines += [f"- {name}, {item['what']}: {_format(item['reason'])}" for name, item in unsupported]
        errors = [(name, error) for name, section in self.sections.items() for error in section.get("errors", [])]
        if errors:
            lines += ["", "## Errors", ""]
            lines += [f"- {name}, {error['what']}: `{_format(error['error'])}`" for name, error in errors]
        return "\n".join(lines) + "\n"


def _traceback_tail(error: BaseException, lines: int = 12) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# Timing, memory, FLOPs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop what the previous measurement left, so each peak-memory reading is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


@dataclasses.dataclass
class Timing:
    step_s: list[float]  # the timed steps
    first_call_s: float  # the first warm-up step alone (includes compilation)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def compile_s(self) -> float:
        return max(0.0, self.first_call_s - self.median_s)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> Timing:
    """Run `warmup` (>= 1) untimed steps, then time `steps` steps: CUDA events on a GPU (the device's timeline, no
    host sync between steps), `perf_counter` on a CPU."""
    started = time.perf_counter()
    step()
    synchronize(device)
    first_call_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return Timing([start.elapsed_time(end) / 1000 for start, end in events], first_call_s)
    step_s = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - started)
    return Timing(step_s, first_call_s)


def _cpu_sdpa_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode counts SDPA's CUDA kernels but not its CPU one: the same formulas for the CPU kernel."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of the matmul-like operations `function` runs (FlopCounterMode: mm, bmm, conv, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flop_formulas()) as counter:
        function()
    return counter.get_total_flops()


def measure_matmul_peak(device: torch.device, size: int) -> float:
    """FLOP/s of a `size`^3 bf16 matmul: the denominator of every MFU in this run."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    timing = time_steps(lambda: torch.mm(a, b), device, warmup=3, steps=10)
    return 2 * size**3 / timing.median_s


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores (`set_float32_matmul_precision("high")`) inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def dynamo_graph_count() -> int | None:
    """Graphs Dynamo has compiled so far (more than one per compiled model means a graph break)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter: report nothing rather than fail a measurement
        return None


def accepts_argument(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# The run's context


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


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs


def mim_config(sizes: Sizes, use_patch_aggregation: bool, attn_implementation: str | None = None) -> BeitV2Config:
    overrides = dict(sizes.mim_overrides, image_size=sizes.image_size, use_patch_aggregation=use_patch_aggregation)
    if sizes.tiny_tokenizer:
        overrides["vocab_size"] = tokenizer_config(sizes).num_codes
    if attn_implementation is not None:
        overrides["attn_implementation"] = attn_implementation
    return BeitV2Config.from_preset(sizes.mim_preset, **overrides)


def tokenizer_config(sizes: Sizes, teacher_dim: int = 512) -> VQKDConfig:
    """VQ-KD base-decoder3 (or the tiny one) with a random unit codebook (no k-means initialisation)."""
    if not sizes.tiny_tokenizer:
        return VQKDConfig.from_preset(
            "base-decoder3", image_size=sizes.image_size, kmeans_init=False, teacher_dim=teacher_dim
        )
    grid = sizes.image_size // sizes.patch_size
    return VQKDConfig(
        encoder_config=vqkd_encoder_config(
            "tiny", image_size=sizes.image_size, patch_size=sizes.patch_size, **TINY_VIT
        ),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=grid, code_dim=8, **TINY_VIT),
        num_codes=64,
        code_dim=8,
        teacher_dim=teacher_dim,
        kmeans_init=False,
    )


def attention_implementations(requested: str | None) -> tuple[str, ...]:
    """The attention implementations of our model to time: `requested` (comma-separated), else "eager" and "sdpa",
    then every name that modeling_beitv2 registers with transformers' `AttentionInterface` or lists in a module-level
    constant (an UPPER_CASE tuple/list/set/dict of strings whose name mentions ATTN or ATTENTION).

    "eager" comes first: FLOPs are counted once per model, on its first variant, and eager attention gives the
    model's FLOPs (FlopCounterMode's SDPA backward formula adds the kernel's recomputation).
    """
    if requested:
        return tuple(dict.fromkeys(name.strip() for name in requested.split(",") if name.strip()))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = list(DEFAULT_ATTENTION_IMPLEMENTATIONS)
    package = modeling_beitv2.__name__
    names += [name for name, function in ALL_ATTENTION_FUNCTIONS.items()
              if getattr(function, "__module__", "").split(".")[0] == package]  # fmt: skip
    modules = [modeling_beitv2]
    for submodule in ("attention", "modeling_beitv2"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"{package}.{submodule}"))
    for module in modules:
        for constant, value in vars(module).items():
            if not constant.isupper() or not ("ATTN" in constant or "ATTENTION" in constant):
                continue
            if (
                isinstance(value, (tuple, list, set, frozenset, dict))
                and value
                and all(isinstance(v, str) for v in value)
            ):
                names += sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass
class MimBatch:
    pixel_values: torch.Tensor  # (batch, 3, image_size, image_size)
    bool_masked_pos: torch.Tensor  # (batch, num_patches), exactly `num_masked` True per row
    labels: torch.Tensor  # (batch, num_patches) visual tokens
    masked_labels: torch.Tensor  # (batch * num_masked,) in row-major order
    num_masked: int


def make_mim_batch(sizes: Sizes, vocab_size: int, device: torch.device) -> MimBatch:
    generator = torch.Generator().manual_seed(0)
    batch, size = sizes.batch_size, sizes.image_size
    num_patches = (size // sizes.patch_size) ** 2
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, : sizes.num_masked_patches], True)
    labels = torch.randint(0, vocab_size, (batch, num_patches), generator=generator)
    return MimBatch(
        pixel_values.to(device), mask.to(device), labels.to(device), labels[mask].to(device), sizes.num_masked_patches
    )


def measure_training_step(
    bench: Bench,
    section: str,
    fields: dict[str, Any],
    build: Callable[[], nn.Module],
    loss_of: Callable[[nn.Module], torch.Tensor],
    precision: str,
    compiled: bool,
    flops_cache: dict[Any, int],
    flops_key: Any,
) -> dict[str, Any] | None:
    """Time one training step (forward + backward + fused AdamW) of a freshly built model; record it. A failure is
    recorded as an error of `section` and returns None."""
    device, sizes = bench.device, bench.sizes
    description = ", ".join(f"{key} {value}" for key, value in fields.items()) + f", {precision}"
    if compiled:
        description += ", compiled"
    model = optimizer = runner = None
    try:
        free_memory(device)
        model = build().to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        graphs_before = None
        if compiled:
            torch._dynamo.reset()  # a fresh compilation, timed on its own
            graphs_before = dynamo_graph_count()
            runner = torch.compile(model, backend=sizes.compile_backend)
        else:
            runner = model
        losses: list[torch.Tensor] = []

        def step() -> None:
            with autocast(device, precision):
                loss = loss_of(runner)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        timing = time_steps(step, device, sizes.warmup_steps, sizes.timed_steps)
        memory = peak_gib(device)
        last_loss = float(losses[-1])
        if flops_key not in flops_cache:

            def forward_backward() -> None:
                with autocast(device, precision):
                    loss = loss_of(model)
                loss.backward()

            flops_cache[flops_key] = count_flops(forward_backward)
            optimizer.zero_grad(set_to_none=True)
        flops = flops_cache[flops_key]
        graphs_after = dynamo_graph_count() if compiled else None
        record = {
            "table": "mim",
            **fields,
            "compiled": compiled,
            "precision": precision,
            "batch_size": sizes.batch_size,
            "images_per_s": sizes.batch_size / timing.median_s,
            "ms_per_step": 1000 * timing.median_s,
            "gflop_per_image": flops / sizes.batch_size / 1e9,
            "mfu": bench.mfu(flops, timing.median_s),
            "peak_gib": memory,
            "compile_s": timing.compile_s if compiled else None,
            "first_step_s": timing.first_call_s,  # includes lazy kernel compilation (FlexAttention's, autotuning)
            "graphs": None if graphs_before is None or graphs_after is None else graphs_after - graphs_before,
            "loss": last_loss,
        }
        bench.results.add(section, record)
        return record
    except NotImplementedError as error:
        bench.results.add_unsupported(section, description, error)
        return None
    except Exception as error:
        bench.results.add_error(section, description, error)
        return None
    finally:
        model = optimizer = runner = None  # noqa: F841 -- drop the references before freeing the memory
        if compiled:
            torch._dynamo.reset()
        free_memory(device)


# ---------------------------------------------------------------------------------------------------------------
# Section: MIM training step


def mim_section(bench: Bench) -> None:
    from transformers import BeitConfig, BeitForMaskedImageModeling

    sizes, device = bench.sizes, bench.device
    implementations = attention_implementations(bench.args.attn_implementations)
    static = accepts_argument(BeitV2ForMaskedImageModeling.forward, "num_masked_patches")
    vocab_size = mim_config(sizes, True).vocab_size
    batch = make_mim_batch(sizes, vocab_size, device)
    static_kwargs = {"num_masked_patches": batch.num_masked} if static else {}
    flops: dict[Any, int] = {}

    def ours_loss(model: nn.Module) -> torch.Tensor:
        return model(batch.pixel_values, batch.bool_masked_pos, labels=batch.labels, **static_kwargs).loss

    def stock_loss(model: nn.Module) -> torch.Tensor:
        return model(batch.pixel_values, bool_masked_pos=batch.bool_masked_pos, labels=batch.masked_labels).loss

    def stock_model(implementation: str) -> nn.Module:
        # The same backbone options (shared relative position bias, layer scale, ...); BEiT v1's head on every token.
        config = mim_config(sizes, False)
        stock_fields = set(BeitConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
        kwargs = {key: value for key, value in config.to_dict().items() if key in stock_fields}
        return BeitForMaskedImageModeling(BeitConfig(**kwargs, attn_implementation=implementation))

    eager_step_s: dict[str, float] = {}
    for precision in sizes.precisions:
        # The last precision is the one compared (bf16, as on the GPU); earlier ones (fp32 in --quick) only run the
        # training configuration, to check that they work.
        compared = precision == sizes.precisions[-1]
        for aggregation in (True, False) if compared else (True,):
            for implementation in implementations:
                record = measure_training_step(
                    bench,
                    "mim",
                    {"model": "ours", "attention": implementation, "aggregation": aggregation, "static_count": static},
                    partial(
                        lambda a, i: BeitV2ForMaskedImageModeling(mim_config(sizes, a, i)), aggregation, implementation
                    ),
                    ours_loss,
                    precision,
                    compiled=False,
                    flops_cache=flops,
                    flops_key=("ours", aggregation),
                )
                if record is not None and aggregation and compared:
                    eager_step_s[implementation] = record["ms_per_step"]
        for implementation in [name for name in ("eager", "sdpa") if name in implementations and compared]:
            measure_training_step(
                bench,
                "mim",
                {"model": "transformers BeitForMaskedImageModeling", "attention": implementation, "aggregation": False,
                 "static_count": False},
                partial(stock_model, implementation),
                stock_loss,
                precision,
                compiled=False,
                flops_cache=flops,
                flops_key="transformers",
            )  # fmt: skip

    if bench.args.compile == "off":
        return
    # Compiling takes minutes at ViT-B size: compile the fastest non-eager attention (or the ones asked for).
    if bench.args.compile_attention:
        to_compile = [name.strip() for name in bench.args.compile_attention.split(",") if name.strip()]
    else:
        candidates = {name: ms for name, ms in eager_step_s.items() if name != "eager"} or eager_step_s
        to_compile = [min(candidates, key=candidates.get)] if candidates else []
    for implementation in to_compile:
        measure_training_step(
            bench,
            "mim",
            {"model": "ours", "attention": implementation, "aggregation": True, "static_count": static},
            partial(lambda i: BeitV2ForMaskedImageModeling(mim_config(sizes, True, i)), implementation),
            ours_loss,
            sizes.precisions[-1],
            compiled=True,
            flops_cache=flops,
            flops_key=("ours", True),
        )


# ---------------------------------------------------------------------------------------------------------------
# Section: tokenization


def measure_tokenization(
    bench: Bench,
    section: str,
    fields: dict[str, Any],
    tokenize: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    precision: str,
    flops_per_batch: int,
    reference: torch.Tensor | None = None,
    tf32: bool = False,
    compiled: bool = False,
) -> None:
    """Time `tokenize(inputs)` (no grad, under `precision` autocast, optionally compiled / with TF32 matmuls) and
    record images/s, MFU, peak memory and the fraction of codes equal to `reference`."""
    device, sizes = bench.device, bench.sizes
    try:
        free_memory(device)
        if compiled:
            torch._dynamo.reset()
            tokenize = torch.compile(tokenize, backend=sizes.compile_backend)
        codes: list[torch.Tensor] = []

        def step() -> None:
            with torch.no_grad(), autocast(device, precision):
                codes.append(tokenize(inputs))

        with tf32_matmuls(tf32):
            timing = time_steps(step, device, sizes.warmup_steps, sizes.timed_steps)
        agreement = None if reference is None else (codes[-1] == reference).float().mean().item()
        record = {
            "table": "tokenizer",
            **fields,
            "compiled": compiled,
            "batch_size": inputs.shape[0],
            "images_per_s": inputs.shape[0] / timing.median_s,
            "ms_per_batch": 1000 * timing.median_s,
            "agreement_with_fp32": agreement,
            "gflop_per_image": flops_per_batch / inputs.shape[0] / 1e9,
            "mfu": bench.mfu(flops_per_batch, timing.median_s),
            "peak_gib": peak_gib(device),
            "compile_s": timing.compile_s if compiled else None,
        }
        bench.results.add(section, record)
    except NotImplementedError as error:
        bench.results.add_unsupported(section, ", ".join(str(value) for value in fields.values()), error)
    except Exception as error:
        bench.results.add_error(section, ", ".join(str(value) for value in fields.values()), error)
    finally:
        if compiled:
            torch._dynamo.reset()


def tokenizer_section(bench: Bench) -> None:
    sizes, device = bench.sizes, bench.device
    config = tokenizer_config(sizes)
    torch.manual_seed(0)
    tokenizer = VQKDModel(config).to(device).eval()
    name = "ours, VQ-KD tiny" if sizes.tiny_tokenizer else "ours, VQ-KD base-decoder3"
    size = config.encoder_config.image_size
    generator = torch.Generator().manual_seed(1)
    # The tokenizer's view as the image processor gives it: in [0, 1] (the tokenizer maps it itself).
    pixels = torch.rand(sizes.batch_size, 3, size, size, generator=generator).to(device)
    with tf32_matmuls(False), torch.no_grad():
        reference = tokenizer.get_codebook_indices(pixels)
        flops = count_flops(lambda: tokenizer.get_codebook_indices(pixels))
    variants = [
        ("fp32", "fp32", False, False),
        ("fp32 + TF32 matmuls", "fp32", True, False),
        ("bf16 autocast", "bf16", False, False),
        ("fp16 autocast", "fp16", False, False),
    ]
    if bench.args.compile != "off":
        variants.append(("bf16 autocast", "bf16", False, True))
    for label, precision, tf32, compiled in variants:
        measure_tokenization(
            bench,
            "tokenizer",
            {"model": name, "precision": label},
            tokenizer.get_codebook_indices,
            pixels,
            precision,
            flops,
            reference=reference,
            tf32=tf32,
            compiled=compiled,
        )


# ---------------------------------------------------------------------------------------------------------------
# Section: the official BEiT v2 code


def import_official(directory: str | Path) -> tuple[types.ModuleType, types.ModuleType]:
    """`modeling_pretrain` and `modeling_vqkd` of a microsoft/unilm `beit2/` checkout, imported from there.

    Raises:
        SectionSkipped: the folder is not such a checkout, or its imports fail (timm and einops are needed).
    """
    directory = Path(directory).resolve()
    missing = [name for name in ("modeling_pretrain.py", "modeling_vqkd.py") if not (directory / name).is_file()]
    if missing:
        raise SectionSkipped(
            f"--official_beit2_dir {directory} is not a checkout of microsoft/unilm's beit2/ folder (no {missing[0]})."
        )
    saved = {name: sys.modules.get(name) for name in OFFICIAL_TRAINING_ONLY_MODULES}
    sys.path.insert(0, str(directory))
    try:
        for name in OFFICIAL_TRAINING_ONLY_MODULES:
            sys.modules[name] = _official_stand_in(name)
        return importlib.import_module("modeling_pretrain"), importlib.import_module("modeling_vqkd")
    except ImportError as error:
        raise SectionSkipped(
            f"the official code in {directory} could not be imported ({type(error).__name__}: {error}); it needs timm "
            "and einops (carry an einops wheel to the GPU machine)."
        ) from error
    finally:
        # Its folder holds `utils.py`, `datasets.py`, `transforms.py`: keep them from shadowing anything later.
        sys.path.remove(str(directory))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _official_stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Empty stand-in for the official `{name}` (training only; see bench_gpu.py).")

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"bench_gpu.py replaces the official `{name}` module: teachers are not available.")

    module.clip = types.SimpleNamespace(load=unavailable)
    module.get_dino_vit_base = unavailable
    return module


def official_mim_model(module: types.ModuleType, config: BeitV2Config) -> nn.Module:
    """The official `VisionTransformerForMaskedImageModelingCLS` with `config`'s sizes (BEiT v2 recipe: shared
    relative position bias, no absolute position embedding, layer scale)."""
    return module.VisionTransformerForMaskedImageModelingCLS(
        img_size=config.image_size,
        patch_size=config.patch_size,
        vocab_size=config.vocab_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        init_values=config.layer_scale_init_value,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        drop_path_rate=0.0,
        early_layers=config.early_layers,
        head_layers=config.head_layers,
        shared_lm_head=config.shared_lm_head,
    )


def official_tokenizer(module: types.ModuleType, config: VQKDConfig) -> nn.Module:
    """The official VQKD with `config`'s sizes, as a frozen tokenizer (no teacher), random unit codebook."""
    encoder, decoder = config.encoder_config, config.decoder_config
    encoder_kwargs, decoder_kwargs = module.get_model_default_params(), module.get_model_default_params()
    encoder_kwargs.update(
        img_size=encoder.image_size, patch_size=encoder.patch_size, embed_dim=encoder.hidden_size,
        depth=encoder.num_hidden_layers, num_heads=encoder.num_attention_heads,
        mlp_ratio=encoder.intermediate_size / encoder.hidden_size, num_classes=0,
    )  # fmt: skip
    decoder_kwargs.update(
        img_size=decoder.image_size, patch_size=1, in_chans=config.code_dim, embed_dim=decoder.hidden_size,
        depth=decoder.num_hidden_layers, num_heads=decoder.num_attention_heads,
        mlp_ratio=decoder.intermediate_size / decoder.hidden_size, num_classes=0,
    )  # fmt: skip
    return module.VQKD(
        encoder_kwargs,
        decoder_kwargs,
        n_embed=config.num_codes,
        embed_dim=config.code_dim,
        quantize_kmeans_init=False,
        teacher_model_type="None",
        decoder_out_dim=config.teacher_dim,
    )


def official_section(bench: Bench) -> None:
    if not bench.args.official_beit2_dir:
        raise SectionSkipped("no --official_beit2_dir given (a checkout of microsoft/unilm's beit2/ folder).")
    pretrain, vqkd = import_official(bench.args.official_beit2_dir)
    sizes, device = bench.sizes, bench.device
    config = mim_config(sizes, True)
    batch = make_mim_batch(sizes, config.vocab_size, device)
    flops: dict[Any, int] = {}

    def official_loss(model: nn.Module) -> torch.Tensor:
        # As its engine: both heads' logits at the masked positions, one cross-entropy each.
        outputs = model(batch.pixel_values, bool_masked_pos=batch.bool_masked_pos)
        return sum(nn.functional.cross_entropy(logits.float(), batch.masked_labels) for logits in outputs)

    for precision in sizes.precisions:
        measure_training_step(
            bench,
            "official",
            {"model": "official VisionTransformerForMaskedImageModelingCLS", "attention": "eager (its own)",
             "aggregation": True, "static_count": False},
            partial(official_mim_model, pretrain, config),
            official_loss,
            precision,
            compiled=False,
            flops_cache=flops,
            flops_key="official",
        )  # fmt: skip

    # The official engine tokenizes the [0, 1] tokenizer view under fp16 autocast.
    config = tokenizer_config(sizes)
    size = config.encoder_config.image_size
    images = torch.rand(sizes.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    try:
        free_memory(device)
        torch.manual_seed(0)
        tokenizer = official_tokenizer(vqkd, config).to(device).eval()
        with torch.no_grad():
            flops_per_batch = count_flops(lambda: tokenizer.get_codebook_indices(images))
    except Exception as error:
        bench.results.add_error("official", "official VQKD", error)
        return
    measure_tokenization(
        bench,
        "official",
        {"model": "official VQKD", "precision": "fp16 autocast (as its engine)"},
        tokenizer.get_codebook_indices,
        images,
        "fp16",
        flops_per_batch,
    )


# ---------------------------------------------------------------------------------------------------------------
# Images


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


# ---------------------------------------------------------------------------------------------------------------
# Section: input pipeline


def import_examples_module(name: str) -> types.ModuleType:
    """A module of examples/ (which the training scripts import as top-level modules)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)


class MimTransform:
    """run_mim.py's per-image transform: the processor seeded by the stream's generator, numpy outputs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
        self.processor.set_seed(rng)
        features = self.processor.preprocess(image, do_augment=True, return_tensors="np")
        return {name: features[name][0] for name in self.processor.model_input_names}


def loader_worker_counts() -> list[int]:
    """The loader widths measured: all cores but two (one for the training process, one spare), and one."""
    return list(dict.fromkeys([max(1, (os.cpu_count() or 1) - 2), 1]))


def pipeline_section(bench: Bench) -> None:
    try:
        image_datasets = import_examples_module("image_datasets")  # needs `datasets`
    except ImportError as error:
        raise SectionSkipped(
            f"examples/image_datasets.py cannot be imported: {error} (carry the datasets wheels)."
        ) from error
    from processing import BeitV2ImageProcessor

    sizes = bench.sizes
    images = bench.images_dir()
    processor = BeitV2ImageProcessor(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        num_masking_patches=sizes.num_masked_patches,
        tokenizer_image_size=sizes.image_size,
    )
    for workers in loader_worker_counts():
        try:
            kwargs: dict[str, Any] = {"train_dir": str(images)}
            if accepts_argument(image_datasets.load_image_stream, "min_shards"):
                kwargs["min_shards"] = workers
            dataset, image_column = image_datasets.load_image_stream(**kwargs)
            stream = image_datasets.ImageStream(
                dataset, image_column, MimTransform(processor), seed=0, shuffle_buffer_size=1000
            )
            loader = image_datasets.build_dataloader(
                stream, sizes.batch_size, workers, pin_memory=bench.device.type == "cuda"
            )
            measured = measure_loader(
                loader, warmup_batches=max(1, loader.num_workers), seconds=sizes.pipeline_seconds
            )
            bench.results.add(
                "pipeline",
                {
                    "table": "pipeline",
                    "workers": workers,
                    "workers_used": loader.num_workers,
                    "shards": getattr(dataset, "num_shards", None),
                    "batch_size": sizes.batch_size,
                    "images_per_s": measured["images_per_s"],
                    "images_per_s_per_worker": measured["images_per_s"] / max(1, loader.num_workers),
                    "images_timed": measured["images"],
                    "num_files": sizes.num_images,
                    "min_shards_supported": "min_shards" in kwargs,
                },
            )
        except Exception as error:
            bench.results.add_error("pipeline", f"{workers} worker(s)", error)


def measure_loader(loader: Any, warmup_batches: int, seconds: float) -> dict[str, float]:
    """Images/s of a DataLoader after `warmup_batches` batches (worker start-up, first shuffle windows), over at least
    `seconds` and one batch."""
    iterator = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        images, started = 0, time.perf_counter()
        while True:
            batch = next(iterator)
            images += int(batch["pixel_values"].shape[0])
            if time.perf_counter() - started >= seconds:
                break
        elapsed = time.perf_counter() - started
    finally:
        del iterator  # stops the workers
    return {"images_per_s": images / elapsed, "images": images}


# ---------------------------------------------------------------------------------------------------------------
# Section: training scripts end to end


def script_flags(script: str, env: dict[str, str]) -> set[str]:
    """The flags a training script accepts, read from its `--help` (in this process when its `main(argv)` allows it,
    else in a fresh interpreter)."""
    text = ""
    with contextlib.suppress(Exception):
        module = import_examples_module(Path(script).stem)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            module.main(["--help"])
        text = buffer.getvalue()
    if "--output_dir" not in text:
        completed = subprocess.run(
            [sys.executable, str(EXAMPLES_DIR / script), "--help"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
        )  # fmt: skip
        text = completed.stdout
    return set(re.findall(r"--[A-Za-z][A-Za-z0-9_]*", text))


def run_logged(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> int | None:
    """Run `command` in its own process group with its output in `log_path`; None when it was stopped after
    `timeout` seconds (the whole group is killed then, DataLoader workers included)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(1.0, timeout))
        except BaseException as error:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(error, subprocess.TimeoutExpired):
                return None
            raise


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "images_per_second" in record:
                records.append(record)
    return records


def summarize_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean images/s and data-wait fraction over the windows after the warm-up ones, and the last window's losses."""
    steady = records[SCRIPT_WARMUP_WINDOWS:]
    summary: dict[str, Any] = {"steady_windows": len(steady), "steps": records[-1].get("step") if records else None}
    if not steady:
        return summary
    summary["images_per_s"] = statistics.fmean(record["images_per_second"] for record in steady)
    waits = [record["data_wait_fraction"] for record in steady if "data_wait_fraction" in record]
    summary["data_wait_fraction"] = statistics.fmean(waits) if waits else None
    summary["losses"] = {key: value for key, value in steady[-1].items() if "loss" in key and isinstance(value, float)}
    return summary


def saved_config(output_dir: Path, config_class: type, fallback: Callable[[], Any]) -> Any:
    """The config a script saved (its final export, else its newest checkpoint), or `fallback()`."""
    candidates = [output_dir] + sorted(output_dir.glob("checkpoint-*"), key=lambda path: path.stat().st_mtime)[::-1]
    for folder in candidates:
        if (folder / "config.json").is_file():
            with contextlib.suppress(Exception):
                return config_class.from_pretrained(folder)
    return fallback()


def mim_script_flops(bench: Bench, model_config: BeitV2Config, tokenizer_dir: Path, count_batch: int = 4) -> float:
    """FLOPs per image of run_mim.py's step: the MIM forward + backward and the frozen tokenizer's forward."""
    device, sizes = bench.device, bench.sizes
    # Eager attention: the model's FLOPs, without the recomputation FlopCounterMode's SDPA backward formula adds.
    model = BeitV2ForMaskedImageModeling._from_config(copy.deepcopy(model_config), attn_implementation="eager")
    model = model.to(device).train()
    tokenizer = VQKDModel.from_pretrained(tokenizer_dir).to(device).eval()
    small = dataclasses.replace(sizes, batch_size=count_batch)
    batch = make_mim_batch(small, model_config.vocab_size, device)
    static = accepts_argument(model.forward, "num_masked_patches")

    def step() -> None:
        with torch.no_grad():
            tokenizer.get_codebook_indices(batch.pixel_values)
        kwargs = {"num_masked_patches": batch.num_masked} if static else {}
        model(batch.pixel_values, batch.bool_masked_pos, labels=batch.labels, **kwargs).loss.backward()

    try:
        return count_flops(step) / count_batch
    finally:
        model = tokenizer = None  # noqa: F841 -- drop the references before freeing the memory
        free_memory(device)


def vqkd_script_flops(bench: Bench, config: VQKDConfig, teacher_dir: Path, count_batch: int = 4) -> float:
    """FLOPs per image of run_vqkd.py's step: the teacher's forward and the tokenizer's forward + backward."""
    from modeling_beitv2 import TeacherForPatchTargets

    device = bench.device
    model = VQKDModel._from_config(copy.deepcopy(config), attn_implementation="eager").to(device).train()
    teacher = TeacherForPatchTargets.from_pretrained(str(teacher_dir)).to(device)
    size = config.encoder_config.image_size
    pixels = torch.rand(count_batch, 3, size, size, device=device)

    def step() -> None:
        targets = teacher(pixels)
        model(pixels, teacher_features=targets).loss.backward()

    try:
        return count_flops(step) / count_batch
    finally:
        model = teacher = None  # noqa: F841 -- drop the references before freeing the memory
        free_memory(device)


def save_teacher(folder: Path, sizes: Sizes) -> Path:
    """A CLIP-B/16 vision tower with projection (random weights; the tiny one in quick mode), loadable by
    `TeacherForPatchTargets.from_pretrained`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if sizes.tiny_tokenizer:
        config = CLIPVisionConfig(
            **TINY_VIT, image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=16
        )
    else:
        config = CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16, projection_dim=512,
        )  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def scripts_section(bench: Bench) -> None:
    sizes, device = bench.sizes, bench.device
    images = bench.images_dir()
    tokenizer_dir = bench.work_dir / "tokenizer"
    torch.manual_seed(0)
    VQKDModel(tokenizer_config(sizes)).save_pretrained(tokenizer_dir)
    teacher_dir = save_teacher(bench.work_dir / "teacher", sizes)
    free_memory(device)
    workers = loader_worker_counts()[0]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    mim_overrides = ",".join(f"{key}={value}" for key, value in sizes.mim_overrides.items())
    scripts = {
        "run_mim.py": [
            "--tokenizer_name_or_path", str(tokenizer_dir), "--config_name", sizes.mim_preset,
            *(["--config_overrides", mim_overrides] if mim_overrides else []),
            "--image_size", str(sizes.image_size), "--num_masking_patches", str(sizes.num_masked_patches),
        ],
        "run_vqkd.py": [
            "--teacher_name_or_path", str(teacher_dir),
            *(["--config_name", "tiny-decoder1", "--config_overrides",
               ",".join(f"{key}={value}" for key, value in {**TINY_VIT, "num_codes": 64}.items())]
              if sizes.tiny_tokenizer else ["--config_name", "base-decoder3"]),
            "--image_size", str(sizes.image_size),
        ],
    }  # fmt: skip
    for index, (script, script_arguments) in enumerate(scripts.items()):
        try:
            flags = script_flags(script, env)
            chosen = ["--bf16"] if "--bf16" in flags else ["--mixed_precision", "bf16"]
            if bench.args.compile != "off" and not sizes.tiny_tokenizer and "--torch_compile" in flags:
                chosen.append("--torch_compile")  # not in --quick: Inductor takes minutes on a small CPU
            output_dir = bench.work_dir / Path(script).stem
            command = [
                sys.executable, str(EXAMPLES_DIR / script), *script_arguments,
                "--train_dir", str(images), "--output_dir", str(output_dir),
                "--per_device_train_batch_size", str(sizes.batch_size), "--max_steps", str(sizes.script_steps),
                "--logging_steps", str(sizes.script_logging_steps), "--save_steps", str(10 * sizes.script_steps),
                "--dataloader_num_workers", str(workers), "--seed", "0", *chosen,
            ]  # fmt: skip
            # The first script gets half of the section's remaining time, the last one all that is left but
            # what counting its FLOPs takes.
            timeout = bench.remaining_s() / (len(scripts) - index) - SCRIPT_FLOP_COUNT_S
            log_path = bench.work_dir / f"{Path(script).stem}.log"
            started = time.perf_counter()
            returncode = run_logged(command, env, log_path, timeout)
            wall_s = time.perf_counter() - started
            log = log_path.read_text(errors="replace")
            summary = summarize_metrics(read_metrics(output_dir))
            if returncode not in (0, None) or not summary.get("images_per_s"):
                tail = "\n".join(log.splitlines()[-25:])
                raise RuntimeError(f"{script} exited with {returncode} and no steady window; log tail:\n{tail}")
            notes = []
            if returncode is None:
                notes.append(f"stopped after {wall_s:.0f} s (its share of the section's time)")
            if "DataLoader worker(s) instead of" in log:
                notes.append("the data module capped the DataLoader workers (see the log)")
            record = {
                "table": "scripts",
                "script": script,
                **summary,
                "gflop_per_image": None,
                "mfu": None,
                "flags": chosen + ["--dataloader_num_workers", str(workers)],
                "returncode": returncode,
                "wall_s": wall_s,
                "note": "; ".join(notes) or None,
                "log": str(log_path),
            }
            bench.results.add("scripts", record)  # kept even if counting the FLOPs below runs out of time
            if script == "run_mim.py":
                config = saved_config(output_dir, BeitV2Config, lambda: mim_config(sizes, True))
                flops = mim_script_flops(bench, config, tokenizer_dir)
            else:
                config = saved_config(output_dir, VQKDConfig, lambda: tokenizer_config(sizes))
                flops = vqkd_script_flops(bench, config, teacher_dir)
            record.update(gflop_per_image=flops / 1e9, mfu=bench.mfu(flops, 1 / summary["images_per_s"]))
            bench.results.write()
        except Exception as error:
            bench.results.add_error("scripts", script, error)


# ---------------------------------------------------------------------------------------------------------------
# Running the sections


SECTION_FUNCTIONS: dict[str, Callable[[Bench], None]] = {
    "mim": mim_section,
    "tokenizer": tokenizer_section,
    "official": official_section,
    "pipeline": pipeline_section,
    "scripts": scripts_section,
}


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `SectionTimeout` in the main thread after `seconds` (SIGALRM; no limit where it does not exist)."""
    if not hasattr(signal, "setitimer") or not math.isfinite(seconds):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        # Fire again soon in case this one lands in a finalizer, where Python prints and drops exceptions.
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        raise SectionTimeout(f"ran past its time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(
    bench: Bench, sections: list[str], functions: dict[str, Callable[[Bench], None]], budget_s: float
) -> None:
    """Run each section within its time limit and what is left of `budget_s`; a failure, a skip or a timeout is
    recorded and the next section runs."""
    budget_end = time.monotonic() + budget_s
    timeouts = bench.sizes.section_timeouts
    for name in sections:
        left = budget_end - time.monotonic()
        limit = min(timeouts.get(name, budget_s), left)
        if left < MIN_SECTION_S:
            bench.results.start(name)
            bench.results.finish(
                name, "skipped", None, f"no time left of the {budget_s:.0f} s budget (--time_budget_s)"
            )
            continue
        bench.results.start(name)
        started = time.monotonic()
        bench.section_deadline = started + limit
        status, note = "ok", None
        try:
            with time_limit(limit):
                functions[name](bench)
        except SectionSkipped as skip:
            status, note = "skipped", str(skip)
        except SectionTimeout as timeout:
            status, note = "timeout", f"{timeout}; the measurements before it are kept"
        except Exception as error:
            status, note = "error", f"{type(error).__name__}: {error}"
            bench.results.sections[name]["errors"].append(
                {"what": "section", "error": note, "traceback": _traceback_tail(error)}
            )
        except KeyboardInterrupt:
            bench.results.finish(name, "interrupted", time.monotonic() - started)
            raise
        finally:
            bench.section_deadline = math.inf
            free_memory(bench.device)
        bench.results.finish(name, status, time.monotonic() - started, note)


def machine_description(device: torch.device) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "CUDA": torch.version.cuda if device.type == "cuda" else None}
    for package in ("transformers", "accelerate", "datasets", "torchdata", "timm", "einops", "Pillow", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except Exception:  # not installed, or odd metadata: the version is only reported
            versions[package] = None
    versions["Python"] = platform.python_version()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    return {
        "device": device.type,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (with uncommitted changes)" if dirty else "")


def parse_section_timeouts(text: str | None, defaults: dict[str, float]) -> dict[str, float]:
    timeouts = dict(defaults)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in SECTIONS:
            raise ValueError(
                f"--section_timeouts items look like NAME=SECONDS with NAME in {list(SECTIONS)}; got {item!r}."
            )
        timeouts[name] = float(value)
    return timeouts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="See the module docstring for the GPU session's command."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes on the CPU: checks that every section runs.")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"Comma-separated, run in this order: {','.join(SECTIONS)}."
    )
    parser.add_argument("--output", default=None, help="Markdown file (the JSON goes next to it). Default: "
                        "benchmarks/results_gpu.md, or a temporary folder with --quick.")  # fmt: skip
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda for the full run, cpu with --quick.")  # fmt: skip
    parser.add_argument("--official_beit2_dir", default=None, help="A checkout of microsoft/unilm's beit2/ folder.")
    parser.add_argument("--attn_implementations", default=None,
                        help="Comma-separated attention implementations of our model (default: discovered).")  # fmt: skip
    parser.add_argument("--compile", choices=("on", "off"), default="on", help="Measure the torch.compile variants.")
    parser.add_argument("--compile_attention", default=None,
                        help="Attention implementation(s) to compile (default: the fastest non-eager one).")  # fmt: skip
    parser.add_argument("--flex_attention_options", default=None,
                        help="JSON keyword arguments of modeling_beitv2.attention.set_flex_attention_options, e.g. "
                        '\'{"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64}}\', to tune the FlexAttention kernel.')  # fmt: skip
    parser.add_argument("--time_budget_s", type=float, default=None, help="Budget of the whole run (default 480 s).")
    parser.add_argument("--section_timeouts", default=None, help="e.g. 'mim=200,scripts=300' (seconds).")
    parser.add_argument("--work_dir", default=None, help="Keep the generated images, models and logs here.")
    args = parser.parse_args(argv)
    args.sections_list = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in args.sections_list if name not in SECTIONS]
    if unknown or not args.sections_list:
        parser.error(f"--sections: unknown {unknown or 'empty list'}; choose from {', '.join(SECTIONS)}.")
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible.")
    if args.device == "cpu" and not args.quick:
        parser.error(
            "the full measurement (ViT-B/16 at batch 128, 3,000 images, both training scripts) needs a CUDA GPU: on a "
            "CPU it would take hours. Run it on a GPU machine, or pass --quick for the tiny CPU check."
        )
    try:
        args.timeouts = parse_section_timeouts(args.section_timeouts, (QUICK if args.quick else FULL).section_timeouts)
    except ValueError as error:
        parser.error(str(error))
    return args


def apply_flex_attention_options(text: str) -> dict[str, Any]:
    """Set the process-wide FlexAttention options of our model from a JSON object; returns them."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--flex_attention_options must be a JSON object: {error}") from error
    if not isinstance(options, dict):
        raise ValueError(f"--flex_attention_options must be a JSON object, got {text!r}.")
    attention = importlib.import_module(f"{modeling_beitv2.__name__}.attention")
    attention.set_flex_attention_options(**options)
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    flex_options = apply_flex_attention_options(args.flex_attention_options) if args.flex_attention_options else None
    sizes = QUICK if args.quick else FULL
    sizes = dataclasses.replace(
        sizes, section_timeouts=args.timeouts, time_budget_s=args.time_budget_s or sizes.time_budget_s
    )
    device = torch.device(args.device)
    if args.quick and device.type == "cpu":
        # Its numbers only show that everything runs; one thread per process keeps a small shared machine responsive
        # (OpenMP threads spinning against other processes' slow tiny steps down a hundredfold).
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the training scripts it starts
    if args.output:
        output = Path(args.output)
    elif args.quick:
        output = Path(tempfile.gettempdir()) / "bench_gpu_quick" / "results_gpu.md"
    else:
        output = BENCHMARKS_DIR / "results_gpu.md"
    command = "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [name for name in SECTIONS if name in args.sections_list]
    header = {
        "command": command.strip(),
        "machine": machine_description(device),
        "sizes": dataclasses.asdict(sizes),
        "flex_attention_options": flex_options,
        "peak_tflops": None,
    }
    results = Results(output, header)
    with contextlib.ExitStack() as stack:
        work_dir = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work_dir.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, sizes, device, results, work_dir)
        if {"pipeline", "scripts"} & set(sections):
            # Before CUDA and compile threads start: the image writers are forked.
            with contextlib.suppress(Exception):  # a failure here shows up in the sections that need the images
                bench.images_dir()
        try:
            bench.peak_flops = measure_matmul_peak(device, sizes.peak_matmul_size)
            header["peak_tflops"] = bench.peak_flops / 1e12
        except Exception as error:  # MFU columns stay empty; every other number is still measured
            print(f"bf16 matmul peak not measured: {type(error).__name__}: {error}", file=sys.stderr)
        results.write()
        run_sections(bench, sections, SECTION_FUNCTIONS, sizes.time_budget_s)
    print(f"Wrote {results.markdown_path} and {results.json_path}")
    return results.to_dict()


if __name__ == "__main__":
    main()
