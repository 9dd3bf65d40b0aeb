"""How bench_gpu.py measures: step timing (CUDA events on a GPU), peak memory, FLOPs and the bf16 matmul peak.

Plus the precision contexts a measurement runs under (autocast, TF32 matmuls) and Dynamo's graph count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

GiB = 2**30
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
