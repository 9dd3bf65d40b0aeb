"""The offline end-to-end demo (examples/demo.py --quick): teacher -> VQ-KD -> BEiT v2 / BEiT v1-style MIM -> linear
probe and k-NN, through the real scripts. The numbers are read from the files the scripts write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from demo import DEMO_FOLDERS, DEMO_MARKER, prepare_output_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def read_last_metrics(folder: Path) -> dict:
    lines = [line for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


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

    # The summary the demo prints is the one it saves, and the plots are real images.
    results = json.loads((output / "results.json").read_text())
    assert results["probe"]["beitv2"]["linear_probe_top1"] == probes["beitv2"]["linear_probe_top1"]
    assert results["vqkd"]["codebook_usage_eval_images"] == codebook["usage_fraction"]
    for plot in ("loss_curves.png", "codebook/usage_histogram.png"):
        with Image.open(output / plot) as image:
            assert image.size == (640, 400)
    assert (output / "results.md").read_text().strip() in result.stdout


def test_output_dir_is_cleared_only_when_the_demo_wrote_it(tmp_path):
    earlier = tmp_path / "earlier_run"
    prepare_output_dir(earlier)
    (earlier / "vqkd" / "checkpoint-800").mkdir(parents=True)
    (earlier / "my_notes.txt").write_text("kept")
    prepare_output_dir(earlier)
    assert not (earlier / "vqkd").exists() and (earlier / "my_notes.txt").read_text() == "kept"

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "labels.csv").write_text("a,b")
    with pytest.raises(ValueError, match="not empty and was not written by the demo"):
        prepare_output_dir(project)
    assert (project / "data" / "labels.csv").exists()
