#!/usr/bin/env python
"""Measure the BEiT v2 pretraining stack on one CUDA GPU, in one command, and write the table of the results.

    python benchmarks/bench_gpu.py [--official_beit2_dir PATH] [--output benchmarks/results_gpu.md]
    python benchmarks/bench_gpu.py --quick      # tiny sizes on the CPU (~1 min): checks that every section runs

It writes a markdown table (`benchmarks/results_gpu.md` by default) and a JSON file next to it (same name, `.json`),
both rewritten after every measurement, so a run cut short keeps what it measured. Sections, in the order they run
(choose some with `--sections`):

* ``mim``: one MIM training step (forward, backward, fused AdamW) under bf16 autocast: ours with patch aggregation on
  and off, for every attention implementation the model offers, eager and `torch.compile`d (compile time reported
  apart, with the number of graphs Dynamo made), with the static masked count (`num_masked_patches=`) as run_mim.py
  passes it; transformers' `BeitForMaskedImageModeling` in the same process.
* ``tokenizer``: the frozen VQ-KD base-decoder3 `get_codebook_indices`, as run_mim.py calls it, in fp32, fp32 with
  TF32 matmuls, bf16 and fp16 autocast, and compiled under bf16 autocast; with the fraction of codes equal to fp32's
  (random weights, random unit codebook).
* ``official``: with `--official_beit2_dir` (a checkout of microsoft/unilm's ``beit2/``, imported from there, never
  copied here; needs timm and einops), the official `VisionTransformerForMaskedImageModelingCLS` step and the official
  VQKD tokenizer under fp16 autocast, as its training engine calls it.
* ``pipeline``: `BeitV2ImageProcessor` + collation through the project's data path (examples/pretraining/data.py) with `os.cpu_count() - 2` DataLoader workers and with 1, on 500x375 JPEGs
  it writes itself.
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

This file is the entry point: options, the time limits and the run itself. Its sibling modules in benchmarks/ (on
``sys.path`` as the script's folder) hold the rest: `gpu_common.py` (paths, sizes, the run's context, test images),
`gpu_results.py` (the JSON and markdown results), `gpu_timing.py` (timing, memory, FLOPs), and one module per group
of sections, `gpu_cases_model.py` (``mim``, ``tokenizer``), `gpu_cases_official.py`, `gpu_cases_pipeline.py` and
`gpu_cases_scripts.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from gpu_cases_model import mim_section, tokenizer_section
from gpu_cases_official import official_section
from gpu_cases_pipeline import pipeline_section
from gpu_cases_scripts import scripts_section
from gpu_common import BENCHMARKS_DIR, FULL, QUICK, ROOT, SECTIONS, Bench, SectionSkipped, SectionTimeout
from gpu_results import Results, traceback_tail
from gpu_timing import free_memory, measure_matmul_peak

import modeling_beitv2

# A section is not started with less than this left of the run's budget.
MIN_SECTION_S = 5.0


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
                {"what": "section", "error": note, "traceback": traceback_tail(error)}
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
