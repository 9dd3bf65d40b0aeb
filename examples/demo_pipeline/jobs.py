"""The scripts the demo runs: each one's command line at the demo's scale, and the processes that run them.

    run_scripts([Job("run_vqkd.py", vqkd_arguments(...), paths.logs / "run_vqkd.log")])  # {"run_vqkd": seconds}

Every script runs in a fresh Python process, offline and with one thread, its output in its own log file; as many
run at a time as there are CPU cores. The argument builders spell out every setting that differs from the scripts'
defaults, so that a log's first line (the command) reproduces that stage on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

from demo_pipeline.data import CLASS_NAMES
from demo_pipeline.settings import BATCH_SIZE, IMAGE_SIZE, NUM_CODES, PATCH_SIZE, WIDTH

EXAMPLES_DIR = Path(__file__).resolve().parents[1]
# `WIDTH` as a `--config_overrides` fragment.
WIDTH_OVERRIDES = ",".join(f"{key}={value}" for key, value in WIDTH.items())


class Job(NamedTuple):
    """`examples/{script} {arguments}`, its output going to `log_path`."""

    script: str
    arguments: list[str]
    log_path: Path


@dataclass
class RunningScript:
    """A script started by :func:`start_script`."""

    script: str
    log_path: Path
    process: subprocess.Popen
    stream: TextIO
    started: float

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        self.process.terminate()
        self.process.wait()
        self.stream.close()


def start_script(script: str, arguments: list[str], log_path: Path) -> RunningScript:
    """Start `examples/{script} {arguments}` in a fresh Python process (offline, one thread), output to `log_path`."""
    # One thread per process: at this size a training step is many tiny matrix products, for which a second
    # thread costs more in synchronisation than it gains (5x slower on a busy 2-core machine); the cores run
    # independent jobs instead.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(EXAMPLES_DIR / script), *arguments]
    stream = log_path.open("w")
    stream.write(" ".join(command) + "\n\n")
    stream.flush()
    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
    return RunningScript(script, log_path, process, stream, time.perf_counter())


def run_scripts(jobs: list[Job], already_running: list[RunningScript] | None = None) -> dict[str, float]:
    """Run each job (see :func:`start_script`), as many at a time as there are CPU cores counting
    `already_running`, in the order given (the next one starts as soon as any finishes), and wait for them and for
    `already_running`. A failure stops the others and raises with the end of its log.

    Returns:
        The wall-clock seconds of each job (and of `already_running`), keyed by the stem of its log file.
    """
    pending, running, seconds = list(jobs), list(already_running or []), {}
    while pending or running:
        while pending and len(running) < max(1, os.cpu_count() or 1):
            running.append(start_script(*pending.pop(0)))
        finished = [job for job in running if job.process.poll() is not None]
        if not finished:
            time.sleep(0.05)
            continue
        for job in finished:
            running.remove(job)
            job.stream.close()
            seconds[job.log_path.stem] = time.perf_counter() - job.started
            if job.process.returncode != 0:
                for other in running:
                    other.stop()
                tail = job.log_path.read_text()[-4000:]
                raise RuntimeError(
                    f"{job.script} failed with exit code {job.process.returncode}; log {job.log_path}:\n{tail}"
                )
    return seconds


def common_training_arguments(train_dir: Path, output_dir: Path, steps: int, seed: int) -> list[str]:
    """What the pretraining scripts (`run_vqkd.py`, `run_mim.py`, `run_pixel_decoder.py`) share: streamed images
    from the class folders of `train_dir`, the batch size, the number of steps, no checkpoints."""
    return [
        "--train_dir", str(train_dir), "--streaming", "true", "--shuffle_buffer_size", "1024",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", str(BATCH_SIZE),
        "--max_steps", str(steps), "--logging_steps", "10", "--save_steps", "0", "--seed", str(seed),
    ]  # fmt: skip


def vqkd_arguments(train_dir: Path, teacher_dir: Path, output_dir: Path, steps: int, seed: int) -> list[str]:
    """`run_vqkd.py`: a tokenizer of `NUM_CODES` codes distilling the teacher saved in `teacher_dir`."""
    # A fast EMA and an eager dead-code restart, so that a few hundred steps use the whole codebook.
    overrides = (
        f"{WIDTH_OVERRIDES},encoder.num_hidden_layers=3,decoder.num_hidden_layers=1,codebook_size={NUM_CODES},"
        "code_dim=16,decay=0.95,dead_code_threshold=0.5"
    )
    return common_training_arguments(train_dir, output_dir, steps, seed) + [
        "--teacher_name_or_path", str(teacher_dir), "--config_name", "tiny", "--image_size", str(IMAGE_SIZE),
        "--config_overrides", overrides, "--learning_rate", "2e-3", "--warmup_steps", "0.05",
    ]  # fmt: skip


def mim_arguments(
    train_dir: Path, tokenizer_dir: Path, output_dir: Path, steps: int, seed: int, beit_v1: bool
) -> list[str]:
    """`run_mim.py`: BEiT v2 (VQ-KD targets, patch aggregation) or, with `beit_v1`, BEiT v1-style (dVAE targets)."""
    overrides = f"{WIDTH_OVERRIDES},num_hidden_layers=4,patch_size={PATCH_SIZE}"
    if not beit_v1:
        overrides += ",early_layers=2,head_layers=1"
    arguments = common_training_arguments(train_dir, output_dir, steps, seed) + [
        "--tokenizer_name_or_path", str(tokenizer_dir), "--config_name", "tiny", "--config_overrides", overrides,
        "--image_size", str(IMAGE_SIZE), "--learning_rate", "1.5e-3", "--warmup_steps", "0.05",
    ]  # fmt: skip
    return arguments + (["--beit_v1", "true"] if beit_v1 else [])


def pixel_decoder_arguments(train_dir: Path, eval_dir: Path, vqkd_dir: Path, output_dir: Path, steps: int,
                            seed: int, num_train_images: int) -> list[str]:  # fmt: skip
    """`run_pixel_decoder.py` on the tokenizer in `vqkd_dir`, scored on `eval_dir` against the mean-patch baseline
    measured over every training image."""
    overrides = f"{WIDTH_OVERRIDES},num_hidden_layers=2,refine_channels=16"
    return common_training_arguments(train_dir, output_dir, steps, seed) + [
        "--tokenizer_name_or_path", str(vqkd_dir), "--config_overrides", overrides, "--learning_rate", "2e-3",
        "--warmup_steps", "0.05", "--do_eval", "--validation_dir", str(eval_dir),
        "--baseline_images", str(num_train_images),
    ]  # fmt: skip


def fine_tuning_arguments(
    mim_dir: Path, splits: dict[str, Path], output_dir: Path, steps: int, seed: int
) -> list[str]:
    """`run_image_classification.py`: the MIM model in `mim_dir` fine-tuned on `splits["train"]`, evaluated on
    `splits["validation"]`, exported as a native `BeitForImageClassification`."""
    # The small-data recipe, spelled out: crops and flips only. RandAugment, random erasing, mixup, cutmix and label
    # smoothing (the paper's ImageNet recipe) only slow a few hundred steps on 32 px images down.
    return [
        "--model_name_or_path", str(mim_dir), "--train_dir", str(splits["train"]),
        "--validation_dir", str(splits["validation"]), "--output_dir", str(output_dir), "--do_train", "--do_eval",
        "--recipe", "simple", "--rand_augment_num_ops", "0", "--random_erasing", "0", "--mixup_alpha", "0",
        "--cutmix_alpha", "0", "--label_smoothing", "0", "--crop_pct", "1.0", "--drop_path_rate", "0",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH_SIZE),
        "--per_device_eval_batch_size", "128", "--learning_rate", "3e-3", "--layer_decay", "0.85",
        "--head_init_scale", "0.01",
        "--weight_decay", "0.05", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine", "--logging_steps", "10",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", str(seed),
    ]  # fmt: skip


def probe_arguments(model_dir: Path, splits: dict[str, Path], output_dir: Path, epochs: int, seed: int) -> list[str]:
    """`run_linear_probe.py --knn`: a linear probe and weighted 20-NN on the frozen backbone in `model_dir`."""
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--train_dir", str(splits["train"]),
        "--validation_dir", str(splits["validation"]), "--knn", "--knn_k", "20", "--num_train_epochs", str(epochs),
        "--warmup_epochs", "5", "--probe_batch_size", "64", "--device", "cpu", "--seed", str(seed),
    ]  # fmt: skip


def visualize_codebook_arguments(vqkd_dir: Path, image_dir: Path, output_dir: Path) -> list[str]:
    """`visualize_codebook.py`: code usage over every image of `image_dir`, and the patches of the 16 most used
    codes."""
    return [
        "--tokenizer_name_or_path", str(vqkd_dir), "--train_dir", str(image_dir), "--max_images", "100000",
        "--top_k", "16", "--patches_per_code", "64", "--output_dir", str(output_dir), "--device", "cpu",
    ]  # fmt: skip


def visualize_mim_arguments(mim_dir: Path, tokenizer_dir: Path, image_dir: Path, output: Path, seed: int,
                            decoder_dir: Path | None = None) -> list[str]:  # fmt: skip
    """`visualize_mim.py` on the images of `image_dir` (one per class); the codes are painted by the pixel decoder
    in `decoder_dir`, or by the tokenizer itself (a dVAE) without one."""
    arguments = [
        "--model_name_or_path", str(mim_dir), "--tokenizer_name_or_path", str(tokenizer_dir), "--image_dir",
        str(image_dir), "--num_images", str(len(CLASS_NAMES)), "--seed", str(seed), "--panel_size", "128",
        "--output", str(output), "--device", "cpu",
    ]  # fmt: skip
    return arguments + (["--decoder_name_or_path", str(decoder_dir)] if decoder_dir is not None else [])
