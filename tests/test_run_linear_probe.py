"""Linear probe and k-NN on frozen features (examples/run_linear_probe.py): a learnable synthetic task is solved
far above chance, the pooling follows the pretraining (cls with patch aggregation, else mean), and the k-NN vote
matches a hand computation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BeitConfig, BeitModel

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_linear_probe.py"
sys.path.insert(0, str(ROOT / "examples"))

from run_linear_probe import knn_predict  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
# Class = the colour of a square drawn in a random quadrant of a noisy grey image. A frozen random backbone's
# [CLS] token attends almost uniformly, so it keeps the colour but not the location: the task must not need it.
NUM_CLASSES = 4
SQUARE_COLOURS = ((130, 0, 0), (0, 130, 0), (0, 0, 130), (130, 130, 0))


def write_colour_task(root: Path, per_class: dict[str, int], size: int = 32) -> None:
    rng = np.random.default_rng(0)
    half = size // 2
    for split, count in per_class.items():
        for label in range(NUM_CLASSES):
            folder = root / split / f"colour{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(60, 120, size=(size, size, 3))
                quadrant = rng.integers(0, 4)
                top, left = (quadrant // 2) * half, (quadrant % 2) * half
                pixels[top : top + half, left : left + half] += np.array(SQUARE_COLOURS[label])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.png")


def run_probe(checkpoint: Path, data: Path, output_dir: Path, *extra: str, validation: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    validation_args = ["--validation_dir", str(data / "validation")] if validation else []
    command = [
        sys.executable, str(SCRIPT), "--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir),
        "--train_dir", str(data / "train"), *validation_args,
        "--probe_batch_size", "16", "--num_train_epochs", "60", "--warmup_epochs", "5", "--device", "cpu", *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "probe_results.json").read_text())


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    write_colour_task(root, {"train": 24, "validation": 12})
    return root


def test_probe_and_knn_on_patch_aggregation_checkpoint_beat_chance(tmp_path, colour_data):
    torch.manual_seed(0)
    config = BeitV2Config(**TINY, image_size=32, vocab_size=16, early_layers=1, head_layers=1)
    BeitV2ForMaskedImageModeling(config).save_pretrained(tmp_path / "mim")
    results = run_probe(tmp_path / "mim", colour_data, tmp_path / "out", "--knn", "--knn_k", "10")
    assert results["pooling"] == "cls"
    assert results["num_train"] == 4 * 24 and results["num_eval"] == 4 * 12
    # Chance is 0.25; a frozen random backbone keeps enough spatial information for a linear head.
    assert results["linear_probe_top1"] >= 0.8, results
    assert results["knn_top1"] >= 0.6, results


def test_native_checkpoint_without_aggregation_uses_mean_pooling(tmp_path, colour_data):
    torch.manual_seed(0)
    config = BeitConfig(**TINY, image_size=32, use_shared_relative_position_bias=True, use_mean_pooling=False)
    BeitModel(config).save_pretrained(tmp_path / "native")
    results = run_probe(tmp_path / "native", colour_data, tmp_path / "out")
    assert results["pooling"] == "mean"
    assert results["linear_probe_top1"] >= 0.8, results
    assert "knn_top1" not in results


def test_knn_weighted_vote_matches_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.2]])
    scores = knn_predict(train, labels, query, num_classes=3, k=3, temperature=0.5)
    unit = torch.nn.functional.normalize(train, dim=1)
    similarity = (unit @ torch.nn.functional.normalize(query, dim=1).T).squeeze(1)
    top = similarity.topk(3).indices
    expected = torch.zeros(3)
    for index in top:
        expected[labels[index]] += torch.exp(similarity[index] / 0.5)
    torch.testing.assert_close(scores[0], expected)
    assert scores[0].argmax().item() == 0
    with pytest.raises(ValueError, match="knn_k=9"):
        knn_predict(train, labels, query, num_classes=3, k=9)


def test_unreadable_image_is_skipped_not_fatal(tmp_path, colour_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colour_data, data)
    (data / "train" / "colour0" / "truncated.png").write_bytes(
        (data / "train" / "colour0" / "0.png").read_bytes()[:50]
    )
    torch.manual_seed(0)
    BeitModel(BeitConfig(**TINY, image_size=32, use_mean_pooling=False)).save_pretrained(tmp_path / "native")
    results = run_probe(tmp_path / "native", data, tmp_path / "out", "--num_train_epochs", "1", "--warmup_epochs", "0")
    assert results["num_train"] == 4 * 24  # the truncated file is dropped with its label


def test_without_an_evaluation_split_the_probe_holds_out_part_of_the_training_split(tmp_path, colour_data):
    torch.manual_seed(0)
    BeitModel(BeitConfig(**TINY, image_size=32, use_mean_pooling=False)).save_pretrained(tmp_path / "native")
    results = run_probe(
        tmp_path / "native", colour_data, tmp_path / "out", "--num_train_epochs", "1", "--warmup_epochs", "0",
        "--train_val_split", "0.25", validation=False,
    )  # fmt: skip
    assert (results["num_train"], results["num_eval"]) == (72, 24)  # 4 x 24 training images, a quarter held out
