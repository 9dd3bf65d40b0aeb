#!/usr/bin/env python
"""The whole BEiT v2 pipeline at small scale, offline, through the real scripts, in minutes on a laptop CPU.

    python examples/demo.py --output_dir demo_output          # about 5 minutes on 2 CPU cores (at most 10)
    python examples/demo.py --output_dir demo_output --quick  # the reduced run the tests use (about 1 minute)

Stages (every script runs in its own process; the training scripts stream the images with `datasets` from local
files, the probe loads them with `datasets`):

0. data: a generated dataset of 32 px pattern images in 6 classes (`examples/demo_data.py`), as class folders.
1. teacher: BEiT v2 distils a semantic teacher (CLIP ViT-B/16 in the paper, `openai/clip-vit-base-patch16`),
   which cannot be downloaded here. The demo trains a tiny ViT with the labels instead (mean-pooled patch tokens
   -> linear classifier, so that its patch tokens carry the class), and saves it with its image processor so that
   `run_vqkd.py --teacher_name_or_path` loads it like any Hub vision model.
2. VQ-KD tokenizer training: `run_vqkd.py`.
3. masked image modeling: BEiT v2 (`run_mim.py`, VQ-KD targets, patch aggregation) and, for comparison, BEiT
   v1-style (`run_mim.py --beit_v1`). BEiT v1's tokenizer is the DALL-E dVAE, whose weights cannot be downloaded
   here and which this project does not train, so the v1 run uses a randomly initialised tiny dVAE: low-level,
   pixel-derived targets with no semantics, which is the difference between v1's and v2's targets that the
   comparison is about.
4. evaluation: `run_linear_probe.py` (linear probe and k-NN) on the frozen BEiT v2, BEiT v1-style and randomly
   initialised backbones; `visualize_codebook.py` on the tokenizer.

Outputs (in `--output_dir`, whose absolute path is printed at the end): `results.md` / `results.json` (the table
printed at the end), `loss_curves.png`, `codebook/usage_histogram.png`, `codebook/code_*.png`, every model folder
with its `metrics.jsonl`, and the log of every subprocess in `logs/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from demo_data import CLASS_NAMES, load_labelled_images, write_demo_dataset
from plots import line_plot
from torch import nn
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, DVAEConfig, DVAEModel
from processing import VQKDImageProcessor

EXAMPLES_DIR = Path(__file__).resolve().parent
IMAGE_SIZE, PATCH_SIZE = 32, 8
# One tiny ViT width for every network of the demo.
WIDTH = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)


@dataclass(frozen=True)
class DemoSize:
    """How much data and how many steps each stage gets."""

    train_images_per_class: int
    eval_images_per_class: int
    teacher_steps: int
    vqkd_steps: int
    mim_steps: int
    probe_epochs: int


SIZES = {
    "full": DemoSize(
        train_images_per_class=150, eval_images_per_class=50, teacher_steps=1000, vqkd_steps=800, mim_steps=1500,
        probe_epochs=90,
    ),
    "quick": DemoSize(
        train_images_per_class=60, eval_images_per_class=30, teacher_steps=400, vqkd_steps=300, mim_steps=400,
        probe_epochs=60,
    ),
}  # fmt: skip
NUM_CODES = 64
BATCH_SIZE = 32


def log(message: str) -> None:
    print(message, flush=True)


def run_scripts(jobs: list[tuple[str, list[str], Path]]) -> None:
    """Run `examples/{script} {arguments}` for each job in fresh Python processes (offline), as many at a time as
    there are CPU cores; each one's output goes to its log file."""
    # One thread per process: at this size a training step is many tiny matrix products, for which a second
    # thread costs more in synchronisation than it gains (5x slower on a busy 2-core machine); the cores run
    # independent jobs instead.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < max(1, os.cpu_count() or 1):
            script, arguments, log_path = pending.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(EXAMPLES_DIR / script), *arguments]
            stream = log_path.open("w")
            stream.write(" ".join(command) + "\n\n")
            stream.flush()
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
            running.append((process, stream, script, log_path))
        process, stream, script, log_path = running.pop(0)
        process.wait()
        stream.close()
        if process.returncode != 0:
            for other, other_stream, _, _ in running:
                other.terminate()
                other.wait()
                other_stream.close()
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"{script} failed with exit code {process.returncode}; log {log_path}:\n{tail}")


def read_metrics(folder: Path) -> list[dict]:
    """The records a training script wrote to `metrics.jsonl`."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_teacher(train_dir: Path, eval_dir: Path, output_dir: Path, steps: int, seed: int) -> dict:
    """Train a tiny ViT on the labels and save it (with its image processor) as a teacher for `run_vqkd.py`.

    The classifier reads the mean of the final patch tokens, so that every patch token, which is what VQ-KD
    distils, is trained to carry the class. Augmentation: random resized crops (40-100% of the image) and flips.

    Returns:
        The classifier's accuracy on the last training batches and on the evaluation split.
    """
    torch.manual_seed(seed)
    images, labels = load_labelled_images(train_dir)
    config = ViTConfig(**WIDTH, num_hidden_layers=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    backbone = ViTModel(config, add_pooling_layer=False)
    classifier = nn.Linear(config.hidden_size, len(CLASS_NAMES))

    def classify(pixel_values: torch.Tensor) -> torch.Tensor:
        return classifier(backbone(pixel_values=pixel_values).last_hidden_state[:, 1:].mean(dim=1))

    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    # Pixels in [-1, 1]: the teacher's image processor below says mean = std = 0.5.
    augment = VQKDImageProcessor(
        image_size=IMAGE_SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, crop_scale=(0.4, 1.0), seed=seed
    )
    rng = np.random.default_rng(seed)
    backbone.train()
    train_accuracies = []
    for _ in range(steps):
        batch = rng.choice(len(images), BATCH_SIZE, replace=False)
        pixel_values = augment.preprocess(list(images[batch]), do_augment=True, return_tensors="pt")["pixel_values"]
        logits = classify(pixel_values)
        target = torch.from_numpy(labels[batch])
        loss = nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_accuracies.append((logits.argmax(-1) == target).float().mean().item())
    backbone.eval()
    eval_images, eval_labels = load_labelled_images(eval_dir)
    with torch.no_grad():
        pixel_values = augment.preprocess(list(eval_images), return_tensors="pt")["pixel_values"]
        eval_accuracy = (classify(pixel_values).argmax(-1) == torch.from_numpy(eval_labels)).float().mean().item()
    backbone.save_pretrained(output_dir)
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(output_dir)
    return {"train_accuracy": float(np.mean(train_accuracies[-20:])), "eval_accuracy": eval_accuracy}


def common_training_arguments(train_dir: Path, output_dir: Path, steps: int, seed: int) -> list[str]:
    return [
        "--train_dir", str(train_dir), "--streaming", "true", "--shuffle_buffer_size", "1024",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", str(BATCH_SIZE),
        "--max_steps", str(steps), "--logging_steps", "10", "--save_steps", "0", "--seed", str(seed),
    ]  # fmt: skip


def mim_arguments(tokenizer_dir: Path, beit_v1: bool) -> list[str]:
    overrides = (
        f"hidden_size=64,num_attention_heads=4,intermediate_size=128,num_hidden_layers=4,patch_size={PATCH_SIZE}"
    )
    if not beit_v1:
        overrides += ",early_layers=2,head_layers=1"
    arguments = [
        "--tokenizer_name_or_path", str(tokenizer_dir), "--config_name", "tiny", "--config_overrides", overrides,
        "--image_size", str(IMAGE_SIZE), "--learning_rate", "1.5e-3", "--warmup_steps", "0.05",
    ]  # fmt: skip
    return arguments + (["--beit_v1", "true"] if beit_v1 else [])


DEMO_FOLDERS = (
    "logs",
    "data",
    "teacher",
    "vqkd",
    "dvae_random_init",
    "mim_beitv2",
    "mim_beit_v1_style",
    "random_init",
    "codebook",
    "probe",
)


DEMO_MARKER = ".beitv2-demo"


def prepare_output_dir(output: Path) -> Path:
    """An empty folder, or one an earlier demo run wrote (it holds `DEMO_MARKER`), cleared of that run's folders.

    Every run starts afresh: the training scripts refuse to start over next to an earlier run's checkpoints, and
    stale results must not mix with new ones. Any other non-empty folder is refused rather than cleaned.
    """
    if output.exists() and any(output.iterdir()) and not (output / DEMO_MARKER).exists():
        raise ValueError(f"{output} is not empty and was not written by the demo; choose another --output_dir.")
    for name in DEMO_FOLDERS:
        shutil.rmtree(output / name, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARKER).touch()
    return output


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output_dir",
        default="demo_output",
        help="Everything the demo writes goes here: an empty folder, or one of an earlier demo run (cleared).",
    )
    parser.add_argument("--quick", action="store_true", help="The reduced run of the tests (under 3 minutes).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see run_scripts
    size = SIZES["quick" if args.quick else "full"]
    output = prepare_output_dir(Path(args.output_dir).resolve())
    logs = output / "logs"
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        log(f"  done in {timings[name]:.0f} s")
        return time.perf_counter()

    now = time.perf_counter()
    log(f"[0/4] Writing the dataset ({len(CLASS_NAMES)} classes of {IMAGE_SIZE} px patterns) to {output / 'data'}")
    splits = write_demo_dataset(
        output / "data",
        {"train": size.train_images_per_class, "validation": size.eval_images_per_class},
        image_size=IMAGE_SIZE,
        seed=args.seed,
    )
    now = stage("data", now)

    log(f"[1/4] Training the teacher (a tiny ViT, with the labels; real runs use CLIP) for {size.teacher_steps} steps")
    teacher_dir = output / "teacher"
    teacher = train_teacher(splits["train"], splits["validation"], teacher_dir, size.teacher_steps, args.seed)
    log(f"  teacher accuracy on the evaluation split: {teacher['eval_accuracy']:.3f}")
    now = stage("teacher", now)

    log(f"[2/4] Training the VQ-KD tokenizer ({NUM_CODES} codes) with run_vqkd.py for {size.vqkd_steps} steps")
    vqkd_dir = output / "vqkd"
    tokenizer_overrides = (
        "hidden_size=64,num_attention_heads=4,intermediate_size=128,encoder.num_hidden_layers=3,"
        f"decoder.num_hidden_layers=1,num_codes={NUM_CODES},code_dim=16,decay=0.95,dead_code_threshold=0.5"
    )
    vqkd_arguments = common_training_arguments(splits["train"], vqkd_dir, size.vqkd_steps, args.seed) + [
        "--teacher_name_or_path", str(teacher_dir), "--config_name", "tiny", "--image_size", str(IMAGE_SIZE),
        "--config_overrides", tokenizer_overrides, "--learning_rate", "2e-3", "--warmup_steps", "0.05",
    ]  # fmt: skip
    run_scripts([("run_vqkd.py", vqkd_arguments, logs / "run_vqkd.log")])
    now = stage("vqkd", now)

    log("[3/4] Masked image modeling with run_mim.py: BEiT v2 (VQ-KD targets) and BEiT v1-style (random tiny dVAE)")
    dvae_dir = output / "dvae_random_init"
    torch.manual_seed(args.seed)
    dvae_config = DVAEConfig(vocab_size=NUM_CODES, hidden_size=16, num_blocks_per_group=1, image_size=IMAGE_SIZE)
    DVAEModel(dvae_config).save_pretrained(dvae_dir)
    mim_dirs = {"beitv2": output / "mim_beitv2", "beit_v1_style": output / "mim_beit_v1_style"}
    tokenizers = {"beitv2": vqkd_dir, "beit_v1_style": dvae_dir}
    run_scripts(
        [
            (
                "run_mim.py",
                common_training_arguments(splits["train"], folder, size.mim_steps, args.seed)
                + mim_arguments(tokenizers[name], beit_v1=name == "beit_v1_style"),
                logs / f"run_mim_{name}.log",
            )
            for name, folder in mim_dirs.items()
        ]
    )
    random_dir = output / "random_init"
    torch.manual_seed(args.seed)
    # Mean pooling (no patch aggregation) is the stronger of the two poolings for an untrained network.
    random_config = BeitV2Config.from_preset(
        "tiny", **WIDTH, num_hidden_layers=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vocab_size=NUM_CODES,
        use_patch_aggregation=False,
    )  # fmt: skip
    BeitV2ForMaskedImageModeling(random_config).save_pretrained(random_dir)
    now = stage("mim", now)

    log("[4/4] Linear probe and k-NN (run_linear_probe.py), codebook visualisation (visualize_codebook.py)")
    backbones = {"beitv2": mim_dirs["beitv2"], "beit_v1_style": mim_dirs["beit_v1_style"], "random_init": random_dir}
    probe_options = [
        "--train_dir", str(splits["train"]), "--validation_dir", str(splits["validation"]), "--knn",
        "--knn_k", "20", "--num_train_epochs", str(size.probe_epochs), "--warmup_epochs", "5",
        "--probe_batch_size", "64", "--device", "cpu", "--seed", str(args.seed),
    ]  # fmt: skip
    codebook_dir = output / "codebook"
    visualize_options = [
        "--tokenizer_name_or_path", str(vqkd_dir), "--train_dir", str(splits["validation"]), "--max_images",
        "100000", "--top_k", "16", "--patches_per_code", "64", "--output_dir", str(codebook_dir), "--device", "cpu",
    ]  # fmt: skip
    run_scripts(
        [
            (
                "run_linear_probe.py",
                ["--model_name_or_path", str(folder), "--output_dir", str(output / "probe" / name), *probe_options],
                logs / f"run_linear_probe_{name}.log",
            )
            for name, folder in backbones.items()
        ]
        + [("visualize_codebook.py", visualize_options, logs / "visualize_codebook.log")]
    )
    probes = {name: json.loads((output / "probe" / name / "probe_results.json").read_text()) for name in backbones}
    codebook = json.loads((codebook_dir / "codebook_usage.json").read_text())
    stage("evaluation", now)

    vqkd_metrics = read_metrics(vqkd_dir)
    mim_metrics = {name: read_metrics(folder) for name, folder in mim_dirs.items()}
    plot_losses(vqkd_metrics, mim_metrics, output / "loss_curves.png")
    results = {
        "size": asdict(size),
        "num_classes": len(CLASS_NAMES),
        "chance_accuracy": 1 / len(CLASS_NAMES),
        "teacher": teacher,
        "vqkd": {
            "num_codes": NUM_CODES,
            "codebook_usage_eval_images": codebook["usage_fraction"],
            "perplexity_eval_images": codebook["perplexity"],
            "last_logged": vqkd_metrics[-1],
        },
        "mim": {
            name: {
                "masked_token_accuracy": records[-1]["mim_accuracy"],
                "chance_masked_token_accuracy": 1 / NUM_CODES,
                "last_logged": records[-1],
            }
            for name, records in mim_metrics.items()
        },
        "probe": {
            name: {key: value for key, value in result.items() if key != "arguments"}
            for name, result in probes.items()
        },
        "seconds": {**timings, "total": time.perf_counter() - started},
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (output / "results.md").write_text(table + "\n")
    log("\n" + table)
    log(
        f"\nPlots: {output / 'loss_curves.png'}, {codebook_dir / 'usage_histogram.png'}, "
        f"codebook grids {codebook_dir / 'code_*.png'}"
    )
    log(f"All outputs are in {output} (total {results['seconds']['total']:.0f} s)")
    return results


def plot_losses(vqkd_metrics: list[dict], mim_metrics: dict[str, list[dict]], path: Path) -> None:
    """One PNG with the VQ-KD reconstruction loss and the two MIM losses (each divided by its first value, so that
    the three fit one axis)."""
    series = {}
    curves = [("VQ-KD 1 - cosine", vqkd_metrics, "loss_reconstruction")] + [
        (f"MIM {name} loss", records, "loss_mim") for name, records in mim_metrics.items()
    ]
    for label, records, key in curves:
        first = records[0][key] or 1.0
        series[label] = ([r["step"] for r in records], [r[key] / first for r in records])
    line_plot(series, path, title="Training losses (relative to their first logged value)", y_label="loss / first")


def results_table(results: dict) -> str:
    names = {"beitv2": "BEiT v2 (VQ-KD)", "beit_v1_style": "BEiT v1-style (random dVAE)", "random_init": "random init"}
    vqkd = results["vqkd"]
    lines = [
        "| stage | metric | value |",
        "|---|---|---|",
        f"| teacher | classifier accuracy on the evaluation split (chance {results['chance_accuracy']:.3f}) "
        f"| {results['teacher']['eval_accuracy']:.3f} |",
        f"| VQ-KD | codebook usage on the evaluation images | {vqkd['codebook_usage_eval_images']:.1%} "
        f"of {vqkd['num_codes']} |",
        f"| VQ-KD | perplexity on the evaluation images | {vqkd['perplexity_eval_images']:.1f} |",
        f"| VQ-KD | final 1 - cosine to the teacher | {vqkd['last_logged']['loss_reconstruction']:.3f} |",
    ]
    for name, mim in results["mim"].items():
        lines.append(
            f"| MIM {names[name]} | masked-token accuracy (chance {mim['chance_masked_token_accuracy']:.3f}) "
            f"| {mim['masked_token_accuracy']:.3f} |"
        )
    lines += [
        "",
        "| backbone | linear probe top-1 | k-NN top-1 | pooling |",
        "|---|---|---|---|",
    ]
    for name, probe in results["probe"].items():
        lines.append(
            f"| {names[name]} | {probe['linear_probe_top1']:.3f} | {probe['knn_top1']:.3f} | {probe['pooling']} |"
        )
    lines.append(f"\nChance: {results['chance_accuracy']:.3f} ({results['num_classes']} classes).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
