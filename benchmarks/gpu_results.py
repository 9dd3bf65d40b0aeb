"""The results of a bench_gpu.py run: every record and section status, as a JSON file and a markdown table.

:data:`TABLES` names the columns of each section's table; :class:`Results` rewrites both files atomically after every
change, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any


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
        "Input pipeline (`BeitV2ImageProcessor` + collation through the examples' data modules, no model)",
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
        entry = {"what": what, "error": f"{type(error).__name__}: {error}", "traceback": traceback_tail(error)}
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


def traceback_tail(error: BaseException, lines: int = 12) -> str:
    """The last ``lines`` lines of ``error``'s traceback, for the JSON results."""
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)[-lines:])
