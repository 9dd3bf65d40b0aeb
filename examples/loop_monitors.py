"""What the pretraining loops watch while they run: non-finite updates, stop signals and the metrics of a window.

:class:`NonFiniteGuard` skips (and counts) every optimizer update whose gradients are not finite without a per-step
sync; :class:`StopSignal` turns SIGTERM/SIGINT into a flag that all ranks agree on; :class:`MetricsWindow` keeps a
logging window's metrics on the device and reduces them in one all-reduce, with the time spent waiting for data;
:func:`write_record` appends a record to ``metrics.jsonl`` and the trackers. All of them are called from the loops of
`run_mim.py`, `run_vqkd.py` and `run_pixel_decoder.py`, never the other way round.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from checkpoint_folders import METRICS_FILE

logger = logging.getLogger(__name__)

# Above this fraction of a logging window spent waiting for the next batch, the GPU idles for the input pipeline.
DATA_WAIT_WARNING_FRACTION = 0.1


class NonFiniteGuard:
    """Skips every optimizer update whose gradients are not finite, and counts such steps, without a per-step sync.

    A non-finite gradient norm (after a NaN/inf loss, or an overflow in a finite loss's backward) sets
    `found_inf` on the fused AdamW, which then leaves the weights, its moments and its step count untouched -- the
    mechanism `torch.amp.GradScaler` uses. The counters stay on the device; :meth:`longest_run` is read at logging
    steps. Without a fused AdamW the gradients are dropped instead (AdamW skips parameters without gradients), which
    needs a sync. Under DeepSpeed, whose engine steps inside `backward`, :meth:`allows_backward` checks the loss on
    every rank before it (a sync per micro-batch).
    """

    def __init__(self, accelerator: Accelerator, optimizer: torch.optim.Optimizer, num_nonfinite_steps: int = 0):
        self.accelerator = accelerator
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.fused = not self.deepspeed and bool(self.optimizer.defaults.get("fused"))
        device = accelerator.device
        self.num_nonfinite_steps = torch.tensor(num_nonfinite_steps, device=device)
        self.consecutive = torch.zeros((), device=device)  # the current run of non-finite steps
        self.longest = torch.zeros((), device=device)  # the longest run since the last read
        self.skipped_backward = torch.zeros((), device=device)  # DeepSpeed: a micro-batch of this cycle was skipped

    def allows_backward(self, loss: torch.Tensor) -> bool:
        """False when the loss is not finite on some rank under DeepSpeed; always True otherwise (no sync)."""
        if not self.deepspeed:
            return True
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.reduce(bad, reduction="sum").item() > 0:
            self.skipped_backward.fill_(1.0)
            return False
        return True

    def check(self, grad_norm: torch.Tensor | None) -> None:
        """At the end of an accumulation cycle: arm the optimizer to skip this update if `grad_norm` is not finite
        (or DeepSpeed skipped a backward), and count the step."""
        found_inf = self.skipped_backward.clone()
        self.skipped_backward.zero_()
        if grad_norm is not None:
            found_inf = torch.maximum(found_inf, (~torch.isfinite(grad_norm)).float())
        if self.fused:
            self.optimizer.found_inf = found_inf
        elif not self.deepspeed and found_inf.item():
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        self.num_nonfinite_steps = self.num_nonfinite_steps + found_inf.long()
        self.consecutive = (self.consecutive + 1) * found_inf
        self.longest = torch.maximum(self.longest, self.consecutive)

    def longest_run(self) -> int:
        """The longest run of consecutive non-finite steps since the last call (a sync)."""
        longest = int(self.longest.item())
        self.longest = self.consecutive.clone()
        return longest


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag that the loop reads, so that it saves a checkpoint and exits: after the current
    step in a single process; with several, at the next logging step, where the ranks exchange metrics anyway."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, accelerator: Accelerator, is_logging_step: bool) -> str | None:
        """The signal's name when the loop must stop now (on every rank at once), else None."""
        if accelerator.num_processes == 1:
            return self.received
        if not is_logging_step:
            return None
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return None
        return self.received or "a signal to another rank"

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class MetricsWindow:
    """The metrics of one logging window, kept on the device until :meth:`log` reduces them in one all-reduce.

    Averages over the window: the model's metrics over micro-batches with a finite loss, `grad_norm` over optimizer
    steps with a finite norm. Also `images_per_second` (all ranks) and `data_wait_fraction`, the share of the
    window's wall time spent waiting for the next batch; two windows in a row above 10% give a warning.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str, num_workers: int) -> None:
        self.accelerator = accelerator
        self.num_workers = num_workers  # named in the slow-input warning
        self.path = Path(output_dir) / METRICS_FILE
        self.slow_windows = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.num_images, self.data_wait, self.started = 0, 0.0, time.perf_counter()

    def next_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        waited_from = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - waited_from
        self.num_images += next(iter(batch.values())).shape[0]
        return batch

    def add(self, metrics: dict[str, torch.Tensor | None], valid: torch.Tensor | None = None) -> None:
        """Add scalar device tensors (None values are skipped); those where `valid` is False are left out."""
        for name, value in metrics.items():
            if value is None:
                continue
            value = value.detach().float()
            keep = torch.isfinite(value) if valid is None else valid
            self.sums[name] = self.sums.get(name, 0) + torch.where(keep, value, 0.0)
            self.counts[name] = self.counts.get(name, 0) + keep.float()

    def log(self, step: int, extra: dict[str, float | int]) -> dict[str, Any]:
        """Reduce the window over all ranks (one sync), write it with `extra`, and start a new window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        names = list(self.sums)  # the same on every rank, in the same order
        stacked = torch.stack([self.sums[name] for name in names] + [self.counts[name] for name in names])
        totals = self.accelerator.reduce(stacked, reduction="sum").tolist()
        record: dict[str, Any] = {"step": step}
        for name, total, count in zip(names, totals, totals[len(names) :], strict=False):
            if count > 0:  # nothing finite to average: leave the name out
                record[name] = total / count
        data_wait_fraction = self.data_wait / elapsed
        record.update(extra, images_per_second=self.num_images * self.accelerator.num_processes / elapsed)
        record["data_wait_fraction"] = data_wait_fraction
        self.slow_windows = self.slow_windows + 1 if data_wait_fraction > DATA_WAIT_WARNING_FRACTION else 0
        if self.slow_windows == 2:
            logger.warning(
                "The loop waited for data %.0f%% of the last two logging windows: the input pipeline limits the "
                "speed. Raise --dataloader_num_workers (now %s per process) if the machine has spare CPU cores.",
                100 * data_wait_fraction,
                self.num_workers,
            )
        write_record(self.accelerator, self.path, record)
        self._reset()
        return record


def write_record(accelerator: Accelerator, path: Path, record: dict[str, Any]) -> None:
    """Append `record` to `metrics.jsonl` and the log (main process), and give it to the trackers."""
    if accelerator.is_main_process:
        with path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        logger.info("step %d: %s", record["step"], ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
    accelerator.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])


def sum_over_ranks(accelerator: Accelerator, values: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over all ranks (a collective: every rank must call it)."""
    tensor = torch.tensor(list(values.values()), device=accelerator.device, dtype=torch.long)
    return dict(zip(values, accelerator.reduce(tensor, reduction="sum").tolist(), strict=True))
