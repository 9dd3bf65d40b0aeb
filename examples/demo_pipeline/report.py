"""What the demo reports once every script has run: the pipeline example, the figures and the results table.

    examples = classify_with_pipeline(paths.fine_tuning, showcase)  # pipeline("image-classification")
    figure = paths.root / "reconstructions.png"
    shown = plot_reconstructions(paths.vqkd, paths.pixel_decoder, train_dir, showcase, figure)
    logs = TrainingLogs.read(paths)
    plot_losses(logs, paths.root / "loss_curves.png")
    results = collect_results(paths, logs, size, teacher, examples, shown, seconds, job_seconds)
    table = write_results(paths.root, results)  # writes results.json and results.md

Every number comes from the files the scripts wrote (`metrics.jsonl`, `probe_results.json`, `codebook_usage.json`,
`eval_results.json`, `trainer_state.json`); nothing is measured twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from demo_pipeline.data import CLASS_NAMES, load_labelled_images, showcase_class
from demo_pipeline.settings import NUM_CODES, DemoPaths, DemoSize
from modeling_beitv2 import VQKDModel, VQKDPixelDecoder
from pretraining.pixel_baseline import MeanPatchBaseline, psnr
from pretraining.plots import LinePanel, image_grid, line_plot

# How the results table and the loss curves name each MIM run and probed backbone.
TABLE_NAMES = {
    "beitv2": "BEiT v2 (VQ-KD)",
    "beit_v1_style": "BEiT v1-style (random dVAE)",
    "random_init": "random init",
}
CURVE_NAMES = {"beitv2": "BEiT v2 (VQ-KD targets)", "beit_v1_style": "BEiT v1-style (random dVAE)"}


def read_metrics(folder: Path) -> list[dict]:
    """The records a training script wrote to `metrics.jsonl`."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class TrainingLogs:
    """The logged records of every training run: VQ-KD, the MIM runs (by name), the pixel decoder, fine-tuning."""

    vqkd: list[dict]
    mim: dict[str, list[dict]]
    pixel_decoder: list[dict]
    fine_tuning: list[dict]  # the Trainer's `log_history`

    @classmethod
    def read(cls, paths: DemoPaths) -> TrainingLogs:
        return cls(
            vqkd=read_metrics(paths.vqkd),
            mim={name: read_metrics(folder) for name, folder in paths.mim.items()},
            pixel_decoder=read_metrics(paths.pixel_decoder),
            fine_tuning=json.loads((paths.fine_tuning / "trainer_state.json").read_text())["log_history"],
        )


def classify_with_pipeline(model_dir: Path, images: list[Path]) -> list[dict]:
    """Classify the showcase images (one held-out image per class) with `pipeline("image-classification")` on the
    exported folder, as a user would: per image its true class, the top class and score, and the top 3."""
    classifier = pipeline("image-classification", model=str(model_dir), device="cpu")
    results = []
    for path in images:
        predictions = classifier(str(path), top_k=3)
        results.append(
            {
                "image": path.name,
                "true_label": showcase_class(path),
                "top_label": predictions[0]["label"],
                "score": float(predictions[0]["score"]),
                "top_3": [{"label": p["label"], "score": float(p["score"])} for p in predictions],
            }
        )
    return results


@torch.no_grad()
def plot_reconstructions(
    vqkd_dir: Path, decoder_dir: Path, train_dir: Path, images: list[Path], path: Path
) -> list[dict]:
    """Write `path`: one row per image of `images`: the image | the pixel decoder's painting of its codes | the
    mean-patch baseline's (the mean patch of each code over the training images), each with its PSNR.

    Returns:
        Per image, its name and the two PSNRs in dB.
    """
    tokenizer = VQKDModel.from_pretrained(vqkd_dir).eval()
    decoder = VQKDPixelDecoder.from_pretrained(decoder_dir).eval()
    patch_size = tokenizer.image_size // tokenizer.patch_grid[0]
    baseline = MeanPatchBaseline(tokenizer.codebook_size, patch_size, tokenizer.patch_grid)
    train_images, _ = load_labelled_images(train_dir)
    for start in range(0, len(train_images), 256):
        # (N, H, W, 3) uint8 -> (N, 3, H, W) in [0, 1], the tokenizer's view
        pixels = torch.from_numpy(train_images[start : start + 256]).permute(0, 3, 1, 2).float() / 255
        baseline.update(pixels, tokenizer.get_codebook_indices(pixels))
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 255
    codes = tokenizer.get_codebook_indices(pixels)
    painted, mean_patches = decoder.decode(codes), baseline.paint(codes).clamp(0, 1)
    decoder_psnr, baseline_psnr = psnr(painted, pixels).tolist(), psnr(mean_patches, pixels).tolist()
    rows = [[image, ours, theirs] for image, ours, theirs in zip(pixels, painted, mean_patches, strict=True)]
    rows = [[panel.permute(1, 2, 0).numpy() for panel in row] for row in rows]
    captions = [f"{showcase_class(p)}: decoder {ours:.1f} dB, baseline {theirs:.1f} dB"
                for p, ours, theirs in zip(images, decoder_psnr, baseline_psnr, strict=True)]  # fmt: skip
    title = (
        f"VQ-KD codes ({tokenizer.patch_grid[0]}x{tokenizer.patch_grid[1]} of {tokenizer.codebook_size}) painted "
        f"back: PSNR {np.mean(decoder_psnr):.1f} dB (decoder), {np.mean(baseline_psnr):.1f} dB (baseline)"
    )
    columns = ["held-out image", "pixel decoder", "mean-patch baseline"]
    image_grid(rows, path, columns, captions, title=title, panel_size=192)
    return [
        {"image": p.name, "decoder_psnr": ours, "baseline_psnr": theirs}
        for p, ours, theirs in zip(images, decoder_psnr, baseline_psnr, strict=True)
    ]


def plot_losses(logs: TrainingLogs, path: Path) -> None:
    """One PNG of four panels, each training loss as it is (absolute values, each on its own axis): VQ-KD's
    1 - cosine to the teacher, the two MIM cross-entropies, the pixel decoder's MSE and the fine-tuning
    cross-entropy."""

    def curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
        records = [record for record in records if key in record]
        return [record["step"] for record in records], [record[key] for record in records]

    panels = [
        LinePanel("VQ-KD tokenizer", {"1 - cosine to the teacher": curve(logs.vqkd, "loss_reconstruction")},
                  y_label="1 - cosine similarity"),
        LinePanel("Masked image modeling",
                  {CURVE_NAMES[name]: curve(records, "loss_mim") for name, records in logs.mim.items()},
                  y_label="cross-entropy (nats)",
                  reference_lines={f"uniform guess (ln {NUM_CODES})": float(np.log(NUM_CODES))}),
        LinePanel("Pixel decoder", {"training MSE": curve(logs.pixel_decoder, "loss")}, y_label="MSE ([0, 1] pixels)"),
        LinePanel("Fine-tuning (BEiT v2)", {"training cross-entropy": curve(logs.fine_tuning, "loss")},
                  y_label="cross-entropy (nats)"),
    ]  # fmt: skip
    line_plot(panels, path, title="Training losses", panel_size=(480, 340), columns=2)


def collect_results(
    paths: DemoPaths,
    logs: TrainingLogs,
    size: DemoSize,
    teacher: dict[str, float],
    examples: list[dict],
    shown: list[dict],
    seconds: dict[str, float],
    job_seconds: dict[str, float],
) -> dict:
    """Everything `results.json` holds, read from the files the scripts wrote: `teacher` is what
    :func:`demo_pipeline.teacher.train_teacher` returned, `examples` what :func:`classify_with_pipeline` returned, `shown` what
    :func:`plot_reconstructions` returned, `seconds` the wall-clock time of each stage and `job_seconds` that of each
    script."""
    probes = {name: json.loads((paths.probe / name / "probe_results.json").read_text()) for name in paths.backbones}
    codebook = json.loads((paths.codebook / "codebook_usage.json").read_text())
    pixel_eval = [record for record in logs.pixel_decoder if "eval_psnr" in record][-1]
    fine_tuning_eval = json.loads((paths.fine_tuning / "eval_results.json").read_text())
    return {
        "size": asdict(size),
        "num_classes": len(CLASS_NAMES),
        "chance_accuracy": 1 / len(CLASS_NAMES),
        "teacher": teacher,
        "vqkd": {
            "num_codes": NUM_CODES,
            "codebook_usage_eval_images": codebook["usage_fraction"],
            "perplexity_eval_images": codebook["perplexity"],
            "last_logged": logs.vqkd[-1],
        },
        "mim": {
            name: {
                "masked_token_accuracy": records[-1]["mim_accuracy"],
                "chance_masked_token_accuracy": 1 / NUM_CODES,
                "last_logged": records[-1],
            }
            for name, records in logs.mim.items()
        },
        "pixel_decoder": {
            "psnr": pixel_eval["eval_psnr"],
            "baseline_psnr": pixel_eval["eval_baseline_psnr"],
            "shown_images": shown,
            "last_logged": pixel_eval,
        },
        "probe": {
            name: {key: value for key, value in result.items() if key != "arguments"}
            for name, result in probes.items()
        },
        "fine_tuning": {
            "accuracy": fine_tuning_eval["eval_accuracy"],
            "steps": size.fine_tuning_steps,
            "pipeline_example": examples[0],
            "pipeline_examples": examples,
        },
        "seconds": seconds,
        "job_seconds": job_seconds,
    }


def results_table(results: dict) -> str:
    """The Markdown tables of `results.md` (and of the demo's last lines): one metric per stage, the pipeline's
    prediction for each held-out image, and the probes of each backbone."""
    vqkd, pixel, fine_tuning = results["vqkd"], results["pixel_decoder"], results["fine_tuning"]
    examples = fine_tuning["pipeline_examples"]
    right = sum(example["top_label"] == example["true_label"] for example in examples)
    lines = [
        "| stage | metric | value |",
        "|---|---|---|",
        f"| teacher | classifier accuracy on the evaluation split (chance {results['chance_accuracy']:.3f}) "
        f"| {results['teacher']['eval_accuracy']:.3f} |",
        f"| VQ-KD | codebook usage on the evaluation images | {vqkd['codebook_usage_eval_images']:.1%} "
        f"of {vqkd['num_codes']} |",
        f"| VQ-KD | perplexity on the evaluation images | {vqkd['perplexity_eval_images']:.1f} |",
        f"| VQ-KD | final 1 - cosine to the teacher | {vqkd['last_logged']['loss_reconstruction']:.3f} |",
        f"| pixel decoder | PSNR on the evaluation images (mean-patch baseline {pixel['baseline_psnr']:.2f} dB) "
        f"| {pixel['psnr']:.2f} dB |",
    ]
    for name, mim in results["mim"].items():
        lines.append(
            f"| MIM {TABLE_NAMES[name]} | masked-token accuracy (chance {mim['chance_masked_token_accuracy']:.3f}) "
            f"| {mim['masked_token_accuracy']:.3f} |"
        )
    lines += [
        f"| fine-tuning BEiT v2 | top-1 on the evaluation split ({fine_tuning['steps']} steps) "
        f"| {fine_tuning['accuracy']:.3f} |",
        f"| pipeline('image-classification') | one held-out image per class, classified right "
        f"| {right}/{len(examples)} |",
        "",
        "| held-out image | class | pipeline('image-classification') top-1 (score) |",
        "|---|---|---|",
        *(f"| {e['image']} | {e['true_label']} | {e['top_label']} ({e['score']:.3f}) |" for e in examples),
        "",
        "| backbone | linear probe top-1 | k-NN top-1 | pooling |",
        "|---|---|---|---|",
    ]
    for name, probe in results["probe"].items():
        top1 = f"{probe['linear_probe_top1']:.3f} | {probe['knn_top1']:.3f}"
        lines.append(f"| {TABLE_NAMES[name]} | {top1} | {probe['pooling']} |")
    lines.append(f"\nChance: {results['chance_accuracy']:.3f} ({results['num_classes']} classes).")
    return "\n".join(lines)


def write_results(output: Path, results: dict) -> str:
    """Write `results.json` and `results.md` (the :func:`results_table`) to `output`; return the table."""
    (output / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (output / "results.md").write_text(table + "\n")
    return table
