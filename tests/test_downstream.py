"""The stage-3 scripts normalise images the way the checkpoint was pretrained, and share code through downstream.py."""

import ast
from pathlib import Path

import numpy as np
import PIL.Image
from downstream import IMAGENET_MEAN, IMAGENET_STD, evaluation_image_processor, pretraining_normalisation
from transformers import AutoImageProcessor

from processing import BeitV2ImageProcessor


def test_pretraining_normalisation_follows_the_saved_image_processor(tmp_path):
    BeitV2ImageProcessor.for_beit_v1().save_pretrained(tmp_path / "beit_v1")
    assert pretraining_normalisation(str(tmp_path / "beit_v1")) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    BeitV2ImageProcessor().save_pretrained(tmp_path / "beitv2")
    assert pretraining_normalisation(str(tmp_path / "beitv2")) == (IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "weights_only").mkdir()
    assert pretraining_normalisation(str(tmp_path / "weights_only")) == (IMAGENET_MEAN, IMAGENET_STD)


def test_evaluation_processor_resizes_the_shorter_side_then_crops_the_centre(tmp_path):
    # 80x40, white only in its right quarter: a centre crop of the aspect-preserving resize never reaches it,
    # a squash to a square would.
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 60:] = 255
    image = PIL.Image.fromarray(pixels)
    processor = evaluation_image_processor(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_pct=32 / 36)
    processor.save_pretrained(tmp_path)
    for loaded in (processor, AutoImageProcessor.from_pretrained(tmp_path)):
        output = loaded(image, return_tensors="np")["pixel_values"][0]
        assert output.shape == (3, 32, 32)
        # The same with PIL: shorter side to 36 (72x36), then the central 32x32.
        expected = np.asarray(image.resize((72, 36), PIL.Image.BICUBIC).crop((20, 2, 52, 34)), np.float32) / 255
        np.testing.assert_allclose(output, expected.transpose(2, 0, 1), atol=2 / 255)
        assert output.max() < 0.05


def test_no_example_script_imports_another_script():
    """Scripts (files with a `__main__` block) share code through helper modules such as downstream.py: importing
    a script runs its module-level setup and ties the scripts' command lines together."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    trees = {path.stem: ast.parse(path.read_text()) for path in examples.glob("*.py")}
    scripts = {name for name, tree in trees.items() if "__main__" in ast.unparse(tree)}
    assert {"run_image_classification", "run_semantic_segmentation"} <= scripts
    imported = {
        (name, module)
        for name, tree in trees.items()
        for node in ast.walk(tree)
        for module in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.level == 0
            else []
        )
        if module.split(".")[0] in scripts
    }
    assert imported == set()
