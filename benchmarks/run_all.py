#!/usr/bin/env python
"""Run every benchmark of this project and write one table: `benchmarks/results.md` (and `results.json`).

    python benchmarks/run_all.py            # the sizes the README reports (about 10 minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick    # tiny sizes: checks that every benchmark runs (about 2 minutes)

Each `benchmarks/bench_*.py` runs in its own process and prints JSON lines, which are collected as they are.
On top of them, the end-to-end rate of `examples/run_mim.py` (streaming + decoding + augmentation + masking +
tokenizer + model step, read from its `metrics.jsonl`) is measured at the size `bench_mim.py` uses for its
model-only step (ViT-Ti/16, 224 px, batch 8; a randomly initialised VQ-KD tokenizer with a ViT-Ti encoder), so
that the two rates can be compared: their ratio is the share of the step that is the model itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
MIM_SCRIPT = ROOT / "examples" / "run_mim.py"

# (script, arguments for the reported run, arguments for --quick). Sizes of the reported run are each script's
# defaults, which the README sections quoting them were measured with.
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("bench_mim.py", [], ["--steps", "1", "--image_size", "64", "--batch_size", "2"]),
    ("bench_vqkd.py", [], ["--repeats", "1"]),
    ("bench_data_pipeline.py", [], ["--num_images", "20"]),
]
# The end-to-end run_mim.py measurement: same model, resolution and batch as bench_mim.py's defaults.
END_TO_END = {"full": dict(image_size=224, batch_size=8, steps=24, logging_steps=6), "quick": dict(
    image_size=64, batch_size=2, steps=6, logging_steps=2)}  # fmt: skip


def machine_description(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(script: str, arguments: list[str], env: dict) -> list[dict]:
    """Run one bench script; every stdout line that parses as a JSON object is one result."""
    command = [sys.executable, str(BENCHMARKS_DIR / script), *arguments]
    print(f"$ {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    records = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append({"script": script, **json.loads(line)})
            except json.JSONDecodeError:
                continue
    if not records:
        raise RuntimeError(f"{script} printed no JSON result:\n{result.stdout[-2000:]}")
    for record in records:
        print(f"  {json.dumps(record)}", flush=True)
    return records


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-sized JPEGs (500x375, smooth gradients plus noise) so that decoding costs what real images cost."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.linspace(0, 1, 500), np.linspace(0, 1, 375))
    for index in range(count):
        phase = rng.uniform(0, 6)
        base = np.stack([xs, ys, 0.5 * (np.sin(8 * xs + phase) + 1)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)


def run_end_to_end(size: dict, env: dict, work_dir: Path) -> dict:
    """images/s of `examples/run_mim.py` (BEiT v2, ViT-Ti/16) from its metrics.jsonl, first log window excluded
    (it pays for start-up: the first batches, lazy initialisation)."""
    from modeling_beitv2 import VQKDConfig, VQKDModel

    torch.manual_seed(0)
    tokenizer_dir = work_dir / "vqkd_tiny"
    tokenizer_config = VQKDConfig.from_preset("tiny-decoder1", image_size=size["image_size"], kmeans_init=False)
    VQKDModel(tokenizer_config).save_pretrained(tokenizer_dir)
    images_dir = work_dir / "images"
    write_images(images_dir, count=size["batch_size"] * 8)
    output_dir = work_dir / "run_mim"
    command = [
        sys.executable, str(MIM_SCRIPT), "--train_dir", str(images_dir), "--tokenizer_name_or_path", str(tokenizer_dir),
        "--config_name", "tiny", "--image_size", str(size["image_size"]), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(size["batch_size"]), "--max_steps", str(size["steps"]),
        "--logging_steps", str(size["logging_steps"]), "--save_steps", "0", "--shuffle_buffer_size", "64",
    ]  # fmt: skip
    print(f"$ {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"run_mim.py failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = records[1:] or records
    record = {
        "script": "examples/run_mim.py",
        "benchmark": "mim_end_to_end",
        "variant": "run_mim.py BEiT v2, data loading included (1 process, 0 workers)",
        "model": "ViT-Ti/16 + VQ-KD ViT-Ti tokenizer",
        "image_size": size["image_size"],
        "batch_size": size["batch_size"],
        "images_per_s": sum(r["images_per_second"] for r in steady) / len(steady),
        "wall_s": time.perf_counter() - started,
    }
    print(f"  {json.dumps(record)}", flush=True)
    return record


def end_to_end_ratio(end_to_end: dict, records: list[dict]) -> dict | None:
    """End-to-end images/s over bench_mim.py's model-only images/s for the same model (aggregation on)."""
    model_only = [
        r
        for r in records
        if r.get("benchmark") == "mim_train_step"
        and r.get("variant") == "ours_aggregation_on"
        and r.get("image_size") == end_to_end["image_size"]
        and r.get("batch_size") == end_to_end["batch_size"]
    ]
    if not model_only:
        return None
    return {
        "script": "run_all.py",
        "benchmark": "mim_end_to_end_vs_model_only",
        "end_to_end_images_per_s": end_to_end["images_per_s"],
        "model_only_images_per_s": model_only[0]["images_per_s"],
        "end_to_end_over_model_only": end_to_end["images_per_s"] / model_only[0]["images_per_s"],
    }


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_format(item)}" for key, item in value.items())
    return str(value)


LABEL_KEYS = ("variant", "impl", "preset", "model")
SKIPPED_KEYS = {"script", "benchmark", "bench", "machine", *LABEL_KEYS}


def markdown_table(records: list[dict], machine: dict, command: str) -> str:
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    lines = [
        f"`{command}` on {machine['cpu']} ({machine['cores']} cores, {machine['threads']} threads{gpu}), torch "
        f"{machine['torch']}, Python {machine['python']}, {machine['date']}; load average at start "
        f"{_format(list(machine['load_average_at_start'] or []))}.",
        "",
        "| script | benchmark | what | numbers |",
        "|---|---|---|---|",
    ]
    for record in records:
        label = " / ".join(str(record[key]) for key in LABEL_KEYS if key in record) or "-"
        numbers = "; ".join(f"{key} {_format(value)}" for key, value in record.items() if key not in SKIPPED_KEYS)
        name = record.get("benchmark") or record.get("bench") or "-"
        lines.append(f"| `{record['script']}` | {name} | {label} | {numbers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, to check that everything runs.")
    parser.add_argument("--threads", type=int, default=2, help="Threads of every benchmark process.")
    parser.add_argument("--output_dir", default=str(BENCHMARKS_DIR), help="Where results.md / results.json go.")
    args = parser.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    machine = machine_description(args.threads)
    records: list[dict] = []
    for script, full_arguments, quick_arguments in BENCHMARKS:
        arguments = quick_arguments if args.quick else full_arguments
        if script in ("bench_mim.py", "bench_vqkd.py"):
            arguments = [*arguments, "--threads", str(args.threads)]
        records += run_benchmark(script, arguments, env)
    with tempfile.TemporaryDirectory() as work_dir:
        end_to_end = run_end_to_end(END_TO_END["quick" if args.quick else "full"], env, Path(work_dir))
    records.append(end_to_end)
    ratio = end_to_end_ratio(end_to_end, records)
    if ratio is not None:
        records.append(ratio)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    (output_dir / "results.json").write_text(
        json.dumps({"command": command, "machine": machine, "results": records}, indent=2) + "\n"
    )
    (output_dir / "results.md").write_text(markdown_table(records, machine, command))
    print(f"Wrote {output_dir / 'results.md'} and {output_dir / 'results.json'}")
    return {"machine": machine, "results": records}


if __name__ == "__main__":
    main()
