"""Each saved kind works where the Hub runs it: the pipeline task its card names runs on the folder in a fresh
process without this package (custom code through `trust_remote_code`), and gives what a plain forward gives.

Kinds and their widgets (the `pipeline_tag` of each card is checked in test_model_cards.py):
- pretrained MIM folder (custom code): `image-feature-extraction` with `trust_remote_code=True`, unmasked;
- its native `feature-extraction/` export (run_mim.py writes it): `image-feature-extraction`, no custom code, so the
  hosted widget works; `pool=True` is the linear probe's representation;
- fine-tuned classifier (native `beit`): `image-classification`;
- segmenter: `image-segmentation` (tests/test_run_semantic_segmentation.py runs it on the script's output);
- VQ-KD, dVAE, pixel decoder: no pipeline task takes or returns visual-token ids, so their cards have no tag.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_without_package
from run_mim import export_feature_extractor
from transformers import AutoModel, BeitForImageClassification, BeitImageProcessor, BeitModel

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, BeitV2Model, convert_mim_to_native_beit
from processing import BeitV2ImageProcessor
from processing.evaluation import evaluation_image_processor

IMAGE_SIZE = (45, 37)  # not square: the processors' crop matters


def test_image() -> PIL.Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


def run_pipeline(task: str, folder: Path, tmp_path: Path, *call_kwargs: dict, trust_remote_code: bool) -> list:
    """`pipeline(task, model=folder)(image, **kwargs)` for each `kwargs` of `call_kwargs`, all in one fresh process
    where this package cannot be imported; the JSON of each output, in order."""
    image_path = tmp_path / "image.png"
    test_image().save(image_path)
    code = f"""
        import json
        import PIL.Image
        import numpy as np
        from transformers import pipeline
        runner = pipeline({task!r}, model={str(folder)!r}, trust_remote_code={trust_remote_code}, device="cpu")
        image = PIL.Image.open({str(image_path)!r}).convert("RGB")
        outputs = [runner(image, **kwargs) for kwargs in {list(call_kwargs)!r}]
        if {task!r} == "image-feature-extraction":
            outputs = [np.asarray(output).tolist() for output in outputs]
        print(json.dumps(outputs))
    """
    result = run_without_package(code, cwd=tmp_path)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mim_folder(tmp_path_factory) -> Path:
    """A pretrained MIM folder as run_mim.py writes it: weights, its BeitV2ImageProcessor, and the native export."""
    folder = tmp_path_factory.mktemp("mim")
    torch.manual_seed(0)
    config = BeitV2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        vocab_size=64,
        early_layers=1,
    )
    BeitV2ForMaskedImageModeling(config).save_pretrained(folder)
    processor = BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=32)
    processor.save_pretrained(folder)
    export_feature_extractor(folder, processor, hub_model_id=None, license=None)
    return folder


@torch.no_grad()
def test_feature_extraction_on_a_pretrained_folder_equals_the_unmasked_forward(mim_folder, tmp_path):
    backbone = AutoModel.from_pretrained(mim_folder).eval()
    assert type(backbone) is BeitV2Model
    pixel_values = BeitV2ImageProcessor.from_pretrained(mim_folder)(test_image(), return_tensors="pt")["pixel_values"]
    expected = backbone(pixel_values=pixel_values)
    tokens, pooled = run_pipeline(
        "image-feature-extraction", mim_folder, tmp_path, {}, {"pool": True}, trust_remote_code=True
    )
    np.testing.assert_allclose(np.asarray(tokens), expected.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=1e-5)
    # The linear probe's representation with the patch-aggregation head: [CLS] after the final LayerNorm.
    torch.testing.assert_close(expected.pooler_output, expected.last_hidden_state[:, 0])


@torch.no_grad()
def test_native_feature_extractor_runs_without_custom_code_and_pools_like_ours(mim_folder, tmp_path):
    native_folder = mim_folder / "feature-extraction"
    config = json.loads((native_folder / "config.json").read_text())
    assert config["model_type"] == "beit" and "auto_map" not in config
    assert not list(native_folder.glob("*.py"))  # no custom code
    assert "pipeline_tag: image-feature-extraction" in (native_folder / "README.md").read_text()
    native = BeitModel.from_pretrained(native_folder).eval()
    processor = BeitImageProcessor.from_pretrained(native_folder)
    pixel_values = processor(test_image(), return_tensors="pt")["pixel_values"]
    expected = native(pixel_values=pixel_values)
    tokens, pooled = run_pipeline(
        "image-feature-extraction", native_folder, tmp_path, {}, {"pool": True}, trust_remote_code=False
    )
    np.testing.assert_allclose(np.asarray(tokens), expected.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=1e-5)
    # The same features as our backbone on the same pixels: the hosted widget gives the probe's representation.
    ours = AutoModel.from_pretrained(mim_folder).eval()(pixel_values=pixel_values)
    torch.testing.assert_close(expected.last_hidden_state, ours.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(expected.pooler_output, ours.pooler_output, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_classifier_widget_scores_are_the_plain_forwards(mim_folder, tmp_path):
    folder = tmp_path / "classifier"
    mim = BeitV2ForMaskedImageModeling.from_pretrained(mim_folder)
    labels = {0: "red", 1: "green", 2: "blue"}
    classifier = convert_mim_to_native_beit(
        mim, BeitForImageClassification, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}
    ).eval()
    classifier.save_pretrained(folder)
    processor = evaluation_image_processor(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    processor.save_pretrained(folder)
    logits = classifier(pixel_values=processor(test_image(), return_tensors="pt")["pixel_values"]).logits
    expected = dict(zip(labels.values(), logits.softmax(-1)[0].tolist()))
    (predictions,) = run_pipeline("image-classification", folder, tmp_path, {"top_k": 3}, trust_remote_code=False)
    assert len(predictions) == 3  # else the comparison below would hold for an empty answer
    assert {p["label"]: pytest.approx(expected[p["label"]], abs=1e-5) for p in predictions} == {
        p["label"]: p["score"] for p in predictions
    }
