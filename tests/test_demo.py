"""The offline end-to-end demo (examples/demo.py --quick): teacher -> VQ-KD -> BEiT v2 / BEiT v1-style MIM and the
pixel decoder -> linear probe and k-NN, MIM and reconstruction figures, fine-tuning and
pipeline("image-classification") on the exported classifier, through the real scripts. The numbers are read from
the files the scripts write. Also the demo's helpers: its output folder, showcase images and process scheduling."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import demo_pipeline.jobs as demo_jobs
from demo_pipeline.data import CLASS_NAMES, showcase_class, write_demo_dataset, write_showcase
from demo_pipeline.jobs import Job, run_scripts, start_script
from demo_pipeline.settings import DEMO_FILES, DEMO_FOLDERS, DEMO_MARKER, prepare_output_dir
from pretraining.plots import GRID_CAPTION_HEIGHT, GRID_HEADER_HEIGHT

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_last_metrics(folder: Path) -> dict:
    return read_metrics(folder)[-1]


@pytest.mark.slow
def test_quick_demo_learns_codes_tokens_and_features(tmp_path):
    output = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--output_dir", str(output)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"All outputs are in {output}" in result.stdout
    assert "| BEiT v2 (VQ-KD) |" in result.stdout  # the results table is printed
    # A second run in the same folder will start afresh: every folder this one made is one the demo clears.
    assert {path.name for path in output.iterdir() if path.is_dir()} <= set(DEMO_FOLDERS)
    assert {path.name for path in output.iterdir() if path.is_file()} == {DEMO_MARKER, *DEMO_FILES}
    assert (output / DEMO_MARKER).exists()

    # Codebook: more than half of the 64 codes are used on the held-out images.
    codebook = json.loads((output / "codebook" / "codebook_usage.json").read_text())
    assert codebook["num_codes"] == 64
    assert codebook["usage_fraction"] > 0.5, codebook["usage_fraction"]
    assert sum(codebook["counts"]) == codebook["num_patches"] == 6 * 30 * 16
    assert len(list((output / "codebook").glob("code_*.png"))) == 16

    # Masked-token accuracy above chance (1 / codebook size) for both pretraining runs, with both v2 heads.
    v2 = read_last_metrics(output / "mim_beitv2")
    v1 = read_last_metrics(output / "mim_beit_v1_style")
    assert v2["mim_accuracy"] > 2 / 64 and v2["aggregation_accuracy"] > 2 / 64, v2
    assert v1["mim_accuracy"] > 2 / 64 and "aggregation_accuracy" not in v1, v1
    assert v2["step"] == v1["step"] == 400

    # The pretrained BEiT v2 backbone beats a randomly initialised one in the linear probe and in k-NN.
    probes = {
        name: json.loads((output / "probe" / name / "probe_results.json").read_text())
        for name in ("beitv2", "beit_v1_style", "random_init")
    }
    assert probes["beitv2"]["pooling"] == "cls" and probes["random_init"]["pooling"] == "mean"
    assert probes["beitv2"]["linear_probe_top1"] > probes["random_init"]["linear_probe_top1"] + 0.1, probes
    assert probes["beitv2"]["knn_top1"] > probes["random_init"]["knn_top1"], probes

    # The summary the demo prints is the one it saves, and the plots are real images of the documented sizes.
    results = json.loads((output / "results.json").read_text())
    assert results["probe"]["beitv2"]["linear_probe_top1"] == probes["beitv2"]["linear_probe_top1"]
    assert results["vqkd"]["codebook_usage_eval_images"] == codebook["usage_fraction"]
    six_rows = GRID_HEADER_HEIGHT + 6 * GRID_CAPTION_HEIGHT
    sizes = {
        "loss_curves.png": (2 * 480, 2 * 340),  # 2 x 2 panels
        "codebook/usage_histogram.png": (640, 400),
        "reconstructions.png": (3 * 192, six_rows + 6 * 192),  # one held-out image per class, 3 columns
        "mim_predictions.png": (4 * 128, six_rows + 6 * 128),
        "mim_predictions_beit_v1.png": (4 * 128, six_rows + 6 * 128),
    }
    for plot, size in sizes.items():
        with Image.open(output / plot) as image:
            assert image.size == size, plot
    assert (output / "results.md").read_text().strip() in result.stdout

    # Pixel decoder: the PSNRs are those run_pixel_decoder.py measured on the evaluation split.
    evaluation = [record for record in read_metrics(output / "pixel_decoder") if "eval_psnr" in record][-1]
    assert results["pixel_decoder"]["psnr"] == evaluation["eval_psnr"] > 10
    assert results["pixel_decoder"]["baseline_psnr"] == evaluation["eval_baseline_psnr"] > 10
    assert len(results["pixel_decoder"]["shown_images"]) == len(CLASS_NAMES)

    # Fine-tuning exports transformers' own classifier, which pipeline() ran on a held-out image.
    config = json.loads((output / "fine_tuning" / "config.json").read_text())
    assert config["model_type"] == "beit" and sorted(config["id2label"].values()) == sorted(CLASS_NAMES)
    fine_tuning = results["fine_tuning"]
    evaluation = json.loads((output / "fine_tuning" / "eval_results.json").read_text())
    assert fine_tuning["accuracy"] == evaluation["eval_accuracy"] > 2 / len(CLASS_NAMES), fine_tuning
    examples = fine_tuning["pipeline_examples"]
    assert [example["true_label"] for example in examples] == list(CLASS_NAMES)  # one held-out image per class
    assert fine_tuning["pipeline_example"] == examples[0]
    for example in examples:
        assert example["top_label"] in CLASS_NAMES and 0 < example["score"] <= 1
        assert example["top_3"][0] == {"label": example["top_label"], "score": example["score"]}
        assert f"| {example['top_label']} ({example['score']:.3f}) |" in result.stdout


def test_output_dir_is_cleared_only_when_the_demo_wrote_it(tmp_path):
    earlier = tmp_path / "earlier_run"
    prepare_output_dir(earlier)
    (earlier / "vqkd" / "checkpoint-800").mkdir(parents=True)
    (earlier / "my_notes.txt").write_text("kept")
    (earlier / "mim_predictions.png").write_bytes(b"stale")
    prepare_output_dir(earlier)
    assert not (earlier / "vqkd").exists() and (earlier / "my_notes.txt").read_text() == "kept"
    assert not (earlier / "mim_predictions.png").exists()

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "labels.csv").write_text("a,b")
    with pytest.raises(ValueError, match="not empty and was not written by the demo"):
        prepare_output_dir(project)
    assert (project / "data" / "labels.csv").exists()


def test_showcase_holds_one_image_per_class_in_order(tmp_path):
    split = write_demo_dataset(tmp_path / "data", {"validation": 2}, image_size=16)["validation"]
    written = write_showcase(split, tmp_path / "showcase")
    assert written == sorted((tmp_path / "showcase").iterdir())  # sorted order = class order
    assert [showcase_class(path) for path in written] == list(CLASS_NAMES)
    for path in written:
        original = split / showcase_class(path) / "00000.png"
        assert path.read_bytes() == original.read_bytes()
    assert len(write_showcase(split, tmp_path / "two", per_class=2)) == 2 * len(CLASS_NAMES)
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        write_showcase(split, tmp_path / "none", per_class=0)


def test_run_scripts_runs_every_job_and_stops_the_others_when_one_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_jobs, "EXAMPLES_DIR", tmp_path)
    monkeypatch.setattr(demo_jobs.os, "cpu_count", lambda: 2)  # two at a time, whatever the machine
    (tmp_path / "ok.py").write_text("import os, sys; print('threads', os.environ['OMP_NUM_THREADS'], sys.argv[1:])")
    (tmp_path / "fails.py").write_text("import sys; print('boom'); sys.exit(3)")
    (tmp_path / "waits.py").write_text("import time; time.sleep(120)")
    logs = tmp_path / "logs"
    jobs = [
        Job("ok.py", ["--flag", "1"], logs / "first.log"),
        *(Job("ok.py", [], logs / f"{i}.log") for i in range(3)),
    ]
    seconds = run_scripts(jobs)
    assert set(seconds) == {"first", "0", "1", "2"} and all(value > 0 for value in seconds.values())
    first = (logs / "first.log").read_text()
    assert first.splitlines()[0].endswith("ok.py --flag 1")  # the command heads its log
    assert "threads 1 ['--flag', '1']" in first

    waiting = start_script("waits.py", [], logs / "waits.log")
    with pytest.raises(RuntimeError, match=r"fails.py failed with exit code 3; log .*fails.log:\n[\s\S]*boom"):
        run_scripts([Job("fails.py", [], logs / "fails.log")], already_running=[waiting])
    assert waiting.process.returncode == -signal.SIGTERM  # stopped, not left running
