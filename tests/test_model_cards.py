"""Model cards: every template renders, its metadata parses, paper and measured numbers stay apart, snippets run."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

from model_cards import CARD_KINDS, render_model_card, split_front_matter, write_model_card
from processing import BeitV2ImageProcessor, VQKDImageProcessor

REQUIRED_METADATA = ("library_name", "pipeline_tag", "tags", "license")


@pytest.mark.parametrize("kind", CARD_KINDS)
def test_every_template_renders_with_hub_metadata(kind):
    card = render_model_card(
        kind,
        model_id="someone/beitv2-base-patch16-224-pt1k",
        family="beitv2",
        size="base",
        base_model="someone/beitv2-base-patch16-224-pt1k-mim",
        datasets=["imagenet-1k"],
        training_args={"learning_rate": 5e-4, "num_train_epochs": 100},
        metrics={"eval_accuracy": 0.8123},
        tags=["demo"],
    )
    metadata, body = split_front_matter(card)
    for key in REQUIRED_METADATA:
        assert metadata[key], key
    assert metadata["library_name"] == "transformers"
    assert metadata["datasets"] == ["imagenet-1k"]
    assert metadata["base_model"] == "someone/beitv2-base-patch16-224-pt1k-mim"
    assert "demo" in metadata["tags"] and {"beit", "beitv2"} & set(metadata["tags"])
    assert "${" not in body and "$" not in body.replace("$ ", "")  # every placeholder filled
    assert "someone/beitv2-base-patch16-224-pt1k" in body
    assert "| learning_rate | 0.0005 |" in body

    # Measured numbers only under "measured", paper numbers only under "reported in the paper".
    measured = body.split("## Results measured by this project")[1].split("## Results reported in the paper")[0]
    paper = body.split("## Results reported in the paper")[1]
    assert "0.8123" in measured and "0.8123" not in paper
    assert "paper" not in measured.lower()
    if kind in ("classifier", "mim"):
        assert "85.0" in paper and "85.0" not in measured and "reported by the paper" in paper
    if kind == "segmentation":
        assert "52.7" in paper and "85.0" not in paper  # only the ADE20K rows describe a segmenter


def test_pipeline_tags_and_custom_code_tags():
    tags = {kind: split_front_matter(render_model_card(kind, model_id="a/b"))[0] for kind in CARD_KINDS}
    assert tags["classifier"]["pipeline_tag"] == "image-classification"
    assert tags["segmentation"]["pipeline_tag"] == "image-segmentation"
    # Native beit checkpoints need no custom code; the others do.
    assert "custom_code" not in tags["classifier"]["tags"] and "custom_code" in tags["vqkd"]["tags"]


def test_without_measurements_or_paper_numbers():
    card = render_model_card("classifier", model_id="a/b", family="beit", size="huge")
    assert "No numbers measured by this project" in card
    assert "The paper reports no numbers for this configuration." in card


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Unknown model card kind 'detector'"):
        render_model_card("detector", model_id="a/b")
    with pytest.raises(ValueError, match="Unknown family 'beit3'"):
        render_model_card("mim", model_id="a/b", family="beit3")
    with pytest.raises(ValueError, match="front-matter"):
        split_front_matter("# no metadata")


def _usage_snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_classifier_snippet_runs_against_a_written_card(tmp_path, monkeypatch):
    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_mean_pooling=True,
        use_relative_position_bias=True,
        num_labels=3,
    )
    model_dir = tmp_path / "beit-tiny-ft"
    BeitForImageClassification(config).save_pretrained(model_dir)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(model_dir)
    path = write_model_card(model_dir, "classifier", model_id=str(model_dir), metrics={"eval_accuracy": 0.5})
    assert path.name == "README.md"
    Image.new("RGB", (40, 30), "red").save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_usage_snippet(path.read_text()), namespace)
    assert namespace["predictions"][0]["label"] in config.id2label.values()


@pytest.mark.parametrize("saved_by", ["run_mim", "converter"])
def test_mim_snippet_runs(tmp_path, monkeypatch, tiny_beitv2_kwargs, saved_by):
    from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

    model_dir = tmp_path / "mim"
    BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).save_pretrained(model_dir)
    # run_mim.py saves its masking processor (custom code, which also returns a mask and a tokenizer view); the
    # converter saves a native BeitImageProcessor. The snippet must work with both.
    if saved_by == "run_mim":
        BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=32).save_pretrained(model_dir)
    else:
        BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(model_dir)
    card = render_model_card("mim", model_id=str(model_dir))
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with torch.no_grad():
        exec(_usage_snippet(card), namespace)
    assert namespace["predicted_tokens"].shape == (8,)  # half of the 16 patches masked
    assert namespace["features"].shape == (1, 17, 32)


def test_vqkd_snippet_runs(tmp_path, monkeypatch):
    from modeling_beitv2 import VQKDConfig, VQKDModel
    from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

    width = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **width),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **width),
        num_codes=16, code_dim=8, teacher_dim=16, kmeans_init=False,
    )  # fmt: skip
    model_dir = tmp_path / "vqkd"
    VQKDModel(config).save_pretrained(model_dir)
    VQKDImageProcessor(image_size=32).save_pretrained(model_dir)  # what run_vqkd.py saves (custom code)
    card = render_model_card("vqkd", model_id=str(model_dir))
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_usage_snippet(card), namespace)
    assert namespace["codes"].shape == (1, 16) and int(namespace["codes"].max()) < 16
