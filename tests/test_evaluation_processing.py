"""The one factory for native `beit` evaluation processors and normalisation (processing/evaluation.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import transformers
from transformers import AutoImageProcessor, BeitImageProcessor
from transformers.testing_utils import CaptureLogger

from processing.evaluation import (
    FAMILY_NORMALISATION,
    evaluation_image_processor,
    family_normalisation,
    saved_normalisation,
)

IMAGENET = FAMILY_NORMALISATION["beitv2"]


def test_saved_normalisation_follows_the_saved_image_processor(tmp_path):
    BeitImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "beit_v1")
    assert saved_normalisation(str(tmp_path / "beit_v1")) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    BeitImageProcessor(image_mean=list(IMAGENET[0]), image_std=list(IMAGENET[1])).save_pretrained(tmp_path / "v2")
    assert saved_normalisation(str(tmp_path / "v2")) == IMAGENET
    (tmp_path / "weights_only").mkdir()
    assert saved_normalisation(str(tmp_path / "weights_only")) == IMAGENET


def test_family_normalisation_names_the_families():
    assert family_normalisation("beit") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert family_normalisation(None) == family_normalisation("beitv2") == IMAGENET
    with pytest.raises(ValueError, match="Unknown model family 'vit'"):
        family_normalisation("vit")


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


def test_without_crop_pct_the_whole_image_is_resized_to_a_square():
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 60:] = 255
    processor = evaluation_image_processor(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_pct=None, resample="bilinear")
    output = processor(PIL.Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
    assert output.shape == (3, 16, 16)
    assert output[:, :, -1].min() > 0.95  # the white quarter survives a squash


def test_the_pil_backend_is_explicit(tmp_path):
    """No torchvision fallback warning when building, saving and loading (with `backend="pil"`) a processor."""
    logger = transformers.utils.logging.get_logger("transformers")
    with CaptureLogger(logger) as captured:
        processor = evaluation_image_processor(32, *IMAGENET)
        processor.save_pretrained(tmp_path)
        loaded = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert "torchvision" not in captured.out
    assert type(processor).__name__ == type(loaded).__name__ == "BeitImageProcessorPil"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"image_size": 0}, "image_size"), ({"crop_pct": 1.5}, "crop_pct"), ({"resample": "nearest"}, "resample")],
)
def test_bad_settings_are_named(kwargs, message):
    settings = {"image_size": 32, "image_mean": IMAGENET[0], "image_std": IMAGENET[1], **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluation_image_processor(**settings)
