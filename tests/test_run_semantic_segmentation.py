"""Segmentation end to end (examples/run_semantic_segmentation.py) on ADE20K-format generated data, and the local
mean_iou / accuracy metric modules against hand-computed numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image
from run_semantic_segmentation import build_segmentation_model
from transformers import AutoModelForSemanticSegmentation, UperNetForSemanticSegmentation, pipeline

from finetuning.param_groups import layer_decay_param_groups
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_semantic_segmentation.py"
METRICS = ROOT / "examples" / "metrics"
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_ade_folder(root: Path, counts: dict[str, int]) -> None:
    """Images split into coloured regions; annotation k + 1 for colour k, 0 (ignored) on a 2-pixel border."""
    rng = np.random.default_rng(0)
    for folder, count in counts.items():
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for index in range(count):
            height, width = 40, 48
            split = int(rng.integers(12, 36))
            annotation = np.ones((height, width), np.uint8)
            annotation[:, split:] = 2
            top = int(rng.integers(4, 20))
            annotation[top : top + 12, 4:16] = 3
            annotation[:2], annotation[:, :2] = 0, 0
            pixels = np.asarray(COLOURS, np.int64)[np.maximum(annotation.astype(np.int64) - 1, 0)]
            pixels = (pixels + rng.integers(-20, 21, size=pixels.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / folder / f"ADE_{index:04d}.jpg")
            Image.fromarray(annotation).save(root / "annotations" / folder / f"ADE_{index:04d}.png")


# A 4-block BEiT v2 on 32 px images with 8 px patches (a 4x4 grid).
TINY_MIM_CONFIG = BeitV2Config(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    image_size=32,
    vocab_size=16,
    early_layers=2,
    head_layers=1,
)


@pytest.mark.slow
def test_segmentation_from_mim_checkpoint_learns_and_writes_miou(tmp_path):
    torch.manual_seed(0)
    BeitV2ForMaskedImageModeling(TINY_MIM_CONFIG).save_pretrained(tmp_path / "mim")
    # 11 + 1 training examples: batches of 4 keep at least 3 images (UperNet's BatchNorm needs 2) after the skip.
    write_ade_folder(tmp_path / "ade", {"training": 11, "validation": 4})
    # One unreadable image (training) and one unreadable annotation (validation): skipped and logged, not fatal.
    images, annotations = tmp_path / "ade" / "images", tmp_path / "ade" / "annotations"
    (images / "training" / "ADE_0099.jpg").write_bytes((images / "training" / "ADE_0000.jpg").read_bytes()[:100])
    shutil.copy(annotations / "training" / "ADE_0000.png", annotations / "training" / "ADE_0099.png")
    shutil.copy(images / "validation" / "ADE_0000.jpg", images / "validation" / "ADE_0099.jpg")
    (annotations / "validation" / "ADE_0099.png").write_bytes(b"not a png")
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "red", "1": "green", "2": "blue"}))
    output_dir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, str(SCRIPT), "--model_name_or_path", str(tmp_path / "mim"), "--data_dir", str(tmp_path / "ade"),
        "--output_dir", str(output_dir), "--num_labels", "3", "--id2label_file", str(tmp_path / "id2label.json"),
        "--crop_size", "32", "--out_indices", "0", "1", "2", "3", "--do_train", "--do_eval", "--max_steps", "40",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
        "--layer_decay", "0.9", "--use_cpu", "--save_strategy", "no", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Skipping image" in result.stderr and "ADE_0099.jpg: unreadable" in result.stderr
    assert "Skipping annotation" in result.stderr and "ADE_0099.png: unreadable" in result.stderr

    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    # Predicting the majority class everywhere gives mIoU about 0.17 and pixel accuracy about 0.5; 40 steps learn
    # the colour regions (measured: mIoU 0.58, pixel accuracy 0.89).
    assert eval_results["eval_mean_iou"] >= 0.35, eval_results
    assert eval_results["eval_overall_accuracy"] >= 0.65, eval_results
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "upernet" and config["backbone_config"]["model_type"] == "beit"
    assert config["backbone_config"]["out_indices"] == [1, 2, 3, 4]  # stages = 0-based blocks + 1
    assert config["use_auxiliary_head"] and config["loss_ignore_index"] == 255
    card = (output_dir / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "| eval_mean_iou |" in card
    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir)
    assert type(model) is UperNetForSemanticSegmentation
    logits = model(pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert logits.shape == (1, 3, 32, 32)  # transformers' UperNet upsamples to the input size
    segments = pipeline("image-segmentation", model=str(output_dir), device="cpu")(
        Image.new("RGB", (48, 40), COLOURS[0])
    )
    assert segments and {segment["label"] for segment in segments} <= {"red", "green", "blue"}
    assert segments[0]["mask"].size == (48, 40)


def test_mean_iou_metric_matches_hand_computation():
    mean_iou = evaluate.load(str(METRICS / "mean_iou"))
    prediction = np.array([[0, 0, 1], [1, 2, 2]])
    reference = np.array([[0, 1, 1], [1, 255, 0]])
    result = mean_iou.compute(predictions=[prediction], references=[reference], num_labels=4)
    # class 0: inter 1, union 3 (pred {0,0}, ref {0,0} at different places) -> 1/3
    # class 1: inter 2, union 3 -> 2/3; class 2: predicted once on a valid pixel, never true -> 0; class 3 absent.
    np.testing.assert_allclose(result["per_category_iou"][:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="outside"):
        mean_iou.compute(predictions=[prediction], references=[reference + 5], num_labels=4, ignore_index=260)


def test_top_k_accuracy_metric_ranks_the_scores():
    top_k_accuracy = evaluate.load(str(METRICS / "top_k_accuracy"))
    scores = [[0.1, 0.5, 0.4, 0.0], [0.9, 0.05, 0.03, 0.02], [0.2, 0.3, 0.1, 0.4]]
    # True-class ranks: 2, 1, 4.
    result = top_k_accuracy.compute(predictions=scores, references=[2, 0, 2], top_k=[1, 2, 3, 4])
    assert result == pytest.approx(
        {"top1_accuracy": 1 / 3, "top2_accuracy": 2 / 3, "top3_accuracy": 2 / 3, "top4_accuracy": 1.0}
    )
    with pytest.raises(ValueError, match="top_k"):
        top_k_accuracy.compute(predictions=scores, references=[2, 0, 2], top_k=[5])


def test_accuracy_metric_takes_class_ids_like_the_hub_metric():
    """The Hub's `accuracy` (sklearn's accuracy_score): predicted ids, optional normalize and sample_weight."""
    accuracy = evaluate.load(str(METRICS / "accuracy"))
    predictions, references, weights = [0, 2, 1, 3, 1], [0, 1, 1, 3, 2], [1.0, 2.0, 0.5, 1.0, 4.0]
    correct = [p == r for p, r in zip(predictions, references)]
    assert accuracy.compute(predictions=predictions, references=references) == {"accuracy": sum(correct) / 5}
    weighted = sum(w for w, c in zip(weights, correct) if c)
    assert accuracy.compute(predictions=predictions, references=references, sample_weight=weights) == pytest.approx(
        {"accuracy": weighted / sum(weights)}
    )
    assert accuracy.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": 3.0}
    with pytest.raises(ValueError, match="expected format"):  # scores are not class ids
        accuracy.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 0])


@pytest.mark.slow
def test_training_folder_alone_holds_out_an_evaluation_split(tmp_path):
    torch.manual_seed(0)
    BeitV2ForMaskedImageModeling(TINY_MIM_CONFIG).save_pretrained(tmp_path / "mim")
    write_ade_folder(tmp_path / "ade", {"training": 8})
    output_dir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, str(SCRIPT), "--model_name_or_path", str(tmp_path / "mim"), "--data_dir", str(tmp_path / "ade"),
        "--output_dir", str(output_dir), "--num_labels", "3", "--crop_size", "32", "--out_indices", "0", "1", "2", "3",
        "--do_train", "--do_eval", "--max_steps", "1", "--per_device_train_batch_size", "3", "--use_cpu",
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--report_to", "none",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "No 'validation' split: holding out 0.15 of 'train'" in result.stderr
    assert "Num examples = 2" in result.stderr  # ceil(0.15 * 8)
    assert "falling back to" not in result.stderr  # the PIL processor is built explicitly, not as a fallback
    assert 0.0 <= json.loads((output_dir / "eval_results.json").read_text())["eval_mean_iou"] <= 1.0
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    # The evaluation transform: the whole image resized (bilinear) to the crop size, ADE20K's labels reduced.
    assert processor["size"] == {"height": 32, "width": 32} and not processor["do_center_crop"]
    assert processor["resample"] == Image.BILINEAR and processor["do_reduce_labels"]


def test_features_come_from_the_requested_blocks_and_every_block_learns(tmp_path):
    mim = BeitV2ForMaskedImageModeling(TINY_MIM_CONFIG)
    mim.save_pretrained(tmp_path / "mim")
    model = build_segmentation_model(
        str(tmp_path / "mim"), [0, 1, 2, 3], 32, {0: "a", 1: "b"}, auxiliary_loss_weight=0.4, drop_path_rate=0.0
    ).eval()
    torch.testing.assert_close(
        model.backbone.beit.embeddings.patch_embeddings.projection.weight,
        mim.beit.embeddings.patch_embeddings.projection.weight,
    )
    pixel_values = torch.randn(2, 3, 32, 32)
    output = model.backbone(pixel_values, output_hidden_states=True)
    # BEiT's FPN keeps the third level as is: it must be the output of block 2 (0-based) = hidden_states[3].
    block2 = output.hidden_states[3][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(output.feature_maps[2], block2)
    # The reference levels include the last block, so it gets a gradient (BeitForSemanticSegmentation's indexing
    # would leave the top blocks out).
    model.train()
    model(pixel_values=pixel_values, labels=torch.randint(0, 2, (2, 32, 32))).loss.backward()
    last_block = model.backbone.beit.layers[-1]
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in last_block.parameters())
    # Layer decay sees the backbone's layout under the UperNet prefix: embeddings 0, block i -> i + 1, rest L + 1.
    groups = layer_decay_param_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5, num_layers=4)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["names"]}
    assert scale_of["backbone.beit.embeddings.patch_embeddings.projection.weight"] == 0.5**5
    assert scale_of["backbone.beit.layers.1.mlp.fc1.weight"] == 0.5**3
    assert scale_of["backbone.fpn.fpn1.conv_transpose1.weight"] == scale_of["decode_head.classifier.weight"] == 1.0
