"""The stage-3 scripts normalise images the way the checkpoint was pretrained."""

from downstream import IMAGENET_MEAN, IMAGENET_STD, pretraining_normalisation

from processing import BeitV2ImageProcessor


def test_pretraining_normalisation_follows_the_saved_image_processor(tmp_path):
    BeitV2ImageProcessor.for_beit_v1().save_pretrained(tmp_path / "beit_v1")
    assert pretraining_normalisation(str(tmp_path / "beit_v1")) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    BeitV2ImageProcessor().save_pretrained(tmp_path / "beitv2")
    assert pretraining_normalisation(str(tmp_path / "beitv2")) == (IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "weights_only").mkdir()
    assert pretraining_normalisation(str(tmp_path / "weights_only")) == (IMAGENET_MEAN, IMAGENET_STD)
