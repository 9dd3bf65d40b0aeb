#!/usr/bin/env python
"""The whole BEiT v2 pipeline at small scale, offline, through the real scripts, in minutes on a laptop CPU.

    python examples/demo.py --output_dir demo_output          # about 6 minutes on 2 CPU cores (at most 10)
    python examples/demo.py --output_dir demo_output --quick  # the reduced run the tests use (2-4 minutes)

Stages (every script runs in its own process; the training scripts stream the images with `datasets` from local
files, the probe loads them with `datasets`):

0. data: a generated dataset of 32 px pattern images in 6 classes (`examples/demo_pipeline/data.py`), as class folders.
1. teacher: BEiT v2 distils a semantic teacher (CLIP ViT-B/16 in the paper, `openai/clip-vit-base-patch16`),
   which cannot be downloaded here. The demo trains a tiny ViT with the labels instead (mean-pooled patch tokens
   -> linear classifier, so that its patch tokens carry the class), and saves it with its image processor so that
   `run_vqkd.py --teacher_name_or_path` loads it like any Hub vision model (`examples/demo_pipeline/teacher.py`).
2. VQ-KD tokenizer training: `run_vqkd.py`.
3. masked image modeling: BEiT v2 (`run_mim.py`, VQ-KD targets, patch aggregation) and, for comparison, BEiT
   v1-style (`run_mim.py --beit_v1`). BEiT v1's tokenizer is the DALL-E dVAE, whose weights cannot be downloaded
   here and which this project does not train, so the v1 run uses a randomly initialised tiny dVAE: low-level,
   pixel-derived targets with no semantics, which is the difference between v1's and v2's targets that the
   comparison is about. It needs neither the teacher nor the VQ-KD tokenizer, so it trains on the second core while
   those two train on the first. Alongside, the pixel decoder (`run_pixel_decoder.py`) learns to paint the VQ-KD
   codes back into pixels, scored in PSNR against the mean-patch baseline (each patch painted with the mean patch
   of its code).
4. evaluation: `run_linear_probe.py` (linear probe and k-NN) on the frozen BEiT v2, BEiT v1-style and randomly
   initialised backbones; `visualize_codebook.py` on the tokenizer; `visualize_mim.py` (the codes each MIM model
   predicts for the masked patches, painted by the pixel decoder for v2 and by the dVAE for v1); and fine-tuning
   where users end: `run_image_classification.py` turns the BEiT v2 MIM model into transformers' own
   `BeitForImageClassification`, which then classifies a held-out image through
   `pipeline("image-classification")`.

Outputs (in `--output_dir`, whose absolute path is printed at the end): `results.md` / `results.json` (the table
printed at the end), `loss_curves.png`, `reconstructions.png` (held-out images | pixel decoder | mean-patch
baseline), `mim_predictions.png` and `mim_predictions_beit_v1.png` (original | masked input | tokenizer codes |
predicted codes), `codebook/usage_histogram.png`, `codebook/code_*.png`, every model folder with its metrics, the
fine-tuned classifier in `fine_tuning/`, and the log of every subprocess in `logs/`.

This file holds the stage sequence; its helpers are in `demo_pipeline/`: `settings.py` (scale, output folder), `data.py`,
`teacher.py`, `jobs.py` (each script's command line, the processes) and `report.py` (figures,
results).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from demo_pipeline.data import CLASS_NAMES, write_demo_dataset, write_showcase
from demo_pipeline.jobs import (
    Job,
    fine_tuning_arguments,
    mim_arguments,
    pixel_decoder_arguments,
    probe_arguments,
    run_scripts,
    start_script,
    visualize_codebook_arguments,
    visualize_mim_arguments,
    vqkd_arguments,
)
from demo_pipeline.report import (
    TrainingLogs,
    classify_with_pipeline,
    collect_results,
    plot_losses,
    plot_reconstructions,
    write_results,
)
from demo_pipeline.settings import IMAGE_SIZE, NUM_CODES, PATCH_SIZE, SIZES, WIDTH, DemoPaths
from demo_pipeline.teacher import train_teacher
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, DVAEConfig, DVAEModel


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run every stage and return what `results.json` holds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output_dir",
        default="demo_output",
        help="Everything the demo writes goes here: an empty folder, or one of an earlier demo run (cleared).",
    )
    parser.add_argument("--quick", action="store_true", help="The reduced run of the tests (2-4 minutes).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see demo_jobs.start_script
    size = SIZES["quick" if args.quick else "full"]
    paths = DemoPaths.prepare(Path(args.output_dir).resolve())
    output, logs, seed = paths.root, paths.logs, args.seed
    started = time.perf_counter()
    timings: dict[str, float] = {}
    job_seconds: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        log(f"  done in {timings[name]:.0f} s")
        return time.perf_counter()

    now = time.perf_counter()
    log(f"[0/5] Writing the dataset ({len(CLASS_NAMES)} classes of {IMAGE_SIZE} px patterns) to {paths.data}")
    splits = write_demo_dataset(
        paths.data,
        {"train": size.train_images_per_class, "validation": size.eval_images_per_class},
        image_size=IMAGE_SIZE,
        seed=seed,
    )
    # One held-out image per class, for the figures and the pipeline example.
    showcase = write_showcase(splits["validation"], paths.data / "showcase")
    now = stage("data", now)

    # BEiT v1-style MIM needs neither the teacher nor the tokenizer trained next, each of which keeps one core busy:
    # it trains on the other core meanwhile, and stage 3 waits for it.
    torch.manual_seed(seed)
    dvae_config = DVAEConfig(codebook_size=NUM_CODES, hidden_size=16, num_blocks_per_group=1, image_size=IMAGE_SIZE)
    DVAEModel(dvae_config).save_pretrained(paths.dvae_random_init)
    log("      (BEiT v1-style MIM, run_mim.py --beit_v1 on a random tiny dVAE, starts in the background: stage 3)")
    beit_v1_mim = start_script(
        "run_mim.py",
        mim_arguments(
            splits["train"], paths.dvae_random_init, paths.mim_beit_v1_style, size.mim_steps, seed, beit_v1=True
        ),
        logs / "run_mim_beit_v1_style.log",
    )
    try:
        teacher_steps = size.teacher_steps
        log(f"[1/5] Training the teacher (a tiny ViT, with the labels; real runs use CLIP) for {teacher_steps} steps")
        teacher = train_teacher(splits["train"], splits["validation"], paths.teacher, size.teacher_steps, seed)
        log(f"  teacher accuracy on the evaluation split: {teacher['eval_accuracy']:.3f}")
        now = stage("teacher", now)

        log(f"[2/5] Training the VQ-KD tokenizer ({NUM_CODES} codes) with run_vqkd.py for {size.vqkd_steps} steps")
        vqkd_job = vqkd_arguments(splits["train"], paths.teacher, paths.vqkd, size.vqkd_steps, seed)
        job_seconds |= run_scripts([Job("run_vqkd.py", vqkd_job, logs / "run_vqkd.log")])
        now = stage("vqkd", now)
    except BaseException:
        beit_v1_mim.stop()
        raise

    log(
        "[3/5] Masked image modeling with run_mim.py: BEiT v2 (VQ-KD targets), and BEiT v1-style (random tiny dVAE, "
        "started after stage 0); the pixel decoder of the VQ-KD codes with run_pixel_decoder.py"
    )
    num_train_images = size.train_images_per_class * len(CLASS_NAMES)
    mim_job = mim_arguments(splits["train"], paths.vqkd, paths.mim_beitv2, size.mim_steps, seed, beit_v1=False)
    pixel_decoder_job = pixel_decoder_arguments(
        splits["train"], splits["validation"], paths.vqkd, paths.pixel_decoder, size.pixel_decoder_steps, seed,
        num_train_images,
    )  # fmt: skip
    job_seconds |= run_scripts(
        [
            Job("run_mim.py", mim_job, logs / "run_mim_beitv2.log"),
            Job("run_pixel_decoder.py", pixel_decoder_job, logs / "run_pixel_decoder.log"),
        ],
        already_running=[beit_v1_mim],
    )
    torch.manual_seed(seed)
    # Mean pooling (no patch aggregation) is the stronger of the two poolings for an untrained network.
    random_config = BeitV2Config.from_preset(
        "tiny", **WIDTH, num_hidden_layers=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vocab_size=NUM_CODES,
        use_patch_aggregation=False,
    )  # fmt: skip
    BeitV2ForMaskedImageModeling(random_config).save_pretrained(paths.random_init)
    now = stage("mim", now)

    log(
        "[4/5] Fine-tuning (run_image_classification.py), linear probe and k-NN (run_linear_probe.py), codebook "
        "(visualize_codebook.py) and MIM predictions (visualize_mim.py)"
    )
    showcase_dir = showcase[0].parent
    fine_tuning_job = fine_tuning_arguments(paths.mim_beitv2, splits, paths.fine_tuning, size.fine_tuning_steps, seed)
    v2_predictions = visualize_mim_arguments(
        paths.mim_beitv2, paths.vqkd, showcase_dir, output / "mim_predictions.png", seed, paths.pixel_decoder
    )
    v1_predictions = visualize_mim_arguments(
        paths.mim_beit_v1_style, paths.dvae_random_init, showcase_dir, output / "mim_predictions_beit_v1.png", seed
    )
    # The longest job first, so that the short ones fill the other core.
    job_seconds |= run_scripts(
        [
            Job("run_image_classification.py", fine_tuning_job, logs / "run_image_classification.log"),
            *(
                Job(
                    "run_linear_probe.py",
                    probe_arguments(backbone, splits, paths.probe / name, size.probe_epochs, seed),
                    logs / f"run_linear_probe_{name}.log",
                )
                for name, backbone in paths.backbones.items()
            ),
            Job(
                "visualize_codebook.py",
                visualize_codebook_arguments(paths.vqkd, splits["validation"], paths.codebook),
                logs / "visualize_codebook.log",
            ),
            Job("visualize_mim.py", v2_predictions, logs / "visualize_mim_beitv2.log"),
            Job("visualize_mim.py", v1_predictions, logs / "visualize_mim_beit_v1_style.log"),
        ]
    )
    now = stage("evaluation", now)

    log("[5/5] The exported classifier through pipeline('image-classification'); figures")
    examples = classify_with_pipeline(paths.fine_tuning, showcase)
    for example in examples:
        log(f"  {example['image']}: {example['top_label']} ({example['score']:.3f})")
    shown = plot_reconstructions(
        paths.vqkd, paths.pixel_decoder, splits["train"], showcase, output / "reconstructions.png"
    )
    training_logs = TrainingLogs.read(paths)
    plot_losses(training_logs, output / "loss_curves.png")
    stage("pipeline_and_figures", now)

    seconds = {**timings, "total": time.perf_counter() - started}
    results = collect_results(paths, training_logs, size, teacher, examples, shown, seconds, job_seconds)
    log("\n" + write_results(output, results))
    figures = ["loss_curves.png", "reconstructions.png", "mim_predictions.png", "mim_predictions_beit_v1.png"]
    log(
        f"\nFigures: {', '.join(str(output / name) for name in figures)}, {paths.codebook / 'usage_histogram.png'}, "
        f"codebook grids {paths.codebook / 'code_*.png'}"
    )
    log(f"All outputs are in {output} (total {seconds['total']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
