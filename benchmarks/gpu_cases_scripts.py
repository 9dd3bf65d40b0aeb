"""bench_gpu.py's ``scripts`` section: examples/run_mim.py and run_vqkd.py end to end as subprocesses.

Each script trains on the generated JPEGs (a random VQ-KD tokenizer / a random CLIP-B/16 teacher saved first) for
its share of the section's time; its speed and losses are read back from its ``metrics.jsonl`` (first window
skipped), and the FLOPs of its step are counted afterwards for the MFU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_cases_model import make_mim_batch, mim_config, tokenizer_config
from gpu_cases_pipeline import loader_worker_counts
from gpu_common import EXAMPLES_DIR, ROOT, TINY_VIT, Bench, Sizes
from gpu_timing import count_flops, free_memory

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, VQKDConfig, VQKDModel

# Windows of a script's metrics.jsonl that pay for start-up (first batches, lazy initialisation, compilation).
SCRIPT_WARMUP_WINDOWS = 1
# Time kept after a training script for counting its FLOPs (building ViT-B models on the CPU, one step).
SCRIPT_FLOP_COUNT_S = 15.0


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

    def step() -> None:
        with torch.no_grad():
            tokenizer.get_codebook_indices(batch.pixel_values)
        loss = model(
            batch.pixel_values, batch.bool_masked_pos, labels=batch.labels, num_masked_patches=batch.num_masked
        ).loss
        loss.backward()

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
               ",".join(f"{key}={value}" for key, value in {**TINY_VIT, "codebook_size": 64}.items())]
              if sizes.tiny_tokenizer else ["--config_name", "base-decoder3"]),
            "--image_size", str(sizes.image_size),
        ],
    }  # fmt: skip
    for index, (script, script_arguments) in enumerate(scripts.items()):
        try:
            chosen = ["--bf16"]
            if bench.args.compile != "off" and not sizes.tiny_tokenizer:
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
