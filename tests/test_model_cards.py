"""Model cards: every kind parses with `huggingface_hub.ModelCard`, `model-index` holds exactly the evaluation metrics
a run measured, sizes come from the saved config, the snippet loads a Hub id (never a local path), `--license` reaches
the metadata, paper and measured numbers stay apart, and the snippets run."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor, UperNetConfig

from modeling_beitv2 import BeitV2Config, DVAEConfig, VQKDConfig, VQKDPixelDecoderConfig
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config
from pretraining.model_cards import (
    CARD_KINDS,
    HUB_ID_PLACEHOLDER,
    TEMPLATES_DIR,
    build_model_card,
    hub_reference,
    split_front_matter,
    write_model_card,
)
from processing import BeitV2ImageProcessor, VQKDImageProcessor

HUB_ID = "someone/beitv2-tiny-demo"
# What the scripts log besides evaluation metrics: none of it may reach a card. Distinctive values, to find them.
TRAINING_NOISE = {
    "step": 55511,
    "lr": 0.000123457,
    "grad_norm": 3.14159,
    "images_per_second": 812.375,
    "data_wait_fraction": 0.0271828,
    "loss": 2.71717,
    "loss_scale": 65536.0,
    "epoch": 3.33333,
    "num_bad_images": 7919,
    "num_nonfinite_steps": 6173,
    "eval_runtime": 12.3456,
    "eval_samples_per_second": 99.8765,
    "eval_loss": 1.23232,
}
# kind -> (evaluation metrics the run measured, their (task type, metric type) in model-index)
MEASURED = {
    "feature_extractor": ({}, {}),
    "classifier": (
        {"eval_accuracy": 0.8123, "eval_top5_accuracy": 0.9641},
        {
            "eval_accuracy": ("image-classification", "accuracy"),
            "eval_top5_accuracy": ("image-classification", "accuracy"),
        },
    ),
    "segmentation": (
        {"eval_mean_iou": 0.4217, "eval_mean_accuracy": 0.5311, "eval_overall_accuracy": 0.7702},
        {
            "eval_mean_iou": ("image-segmentation", "mean_iou"),
            "eval_mean_accuracy": ("image-segmentation", "mean_accuracy"),
            "eval_overall_accuracy": ("image-segmentation", "accuracy"),
        },
    ),
    "mim": (
        {"eval_mim_accuracy": 0.1234, "eval_loss_mim": 3.9876, "eval_aggregation_accuracy": 0.1111},
        {
            "eval_mim_accuracy": ("masked-image-modeling", "accuracy"),
            "eval_loss_mim": ("masked-image-modeling", "loss"),
            "eval_aggregation_accuracy": ("masked-image-modeling", "accuracy"),
        },
    ),
    "vqkd": (
        {"eval_reconstruction_cosine": 0.8765, "eval_codebook_usage": 0.9375, "eval_perplexity": 13.579},
        {
            "eval_reconstruction_cosine": ("image-feature-extraction", "cosine_similarity"),
            "eval_codebook_usage": ("image-feature-extraction", "codebook_usage"),
            "eval_perplexity": ("image-feature-extraction", "perplexity"),
        },
    ),
    "dvae": ({}, {}),  # converted, never trained or evaluated here
    # The mean-patch baseline is measured beside the decoder but is not the decoder's result: table only.
    "pixel_decoder": (
        {"eval_psnr": 21.4321, "eval_baseline_psnr": 17.8765},
        {"eval_psnr": ("image-to-image", "psnr")},
    ),
}
# The widget each kind gets: the pipeline task that runs on its folder (tests/test_hub_widgets.py runs them). The
# tokenizers give code ids and the pixel decoder takes them: no pipeline task fits, so no tag (and no widget).
PIPELINE_TAGS = {
    "mim": "image-feature-extraction",
    "feature_extractor": "image-feature-extraction",
    "classifier": "image-classification",
    "segmentation": "image-segmentation",
    "vqkd": None,
    "dvae": None,
    "pixel_decoder": None,
}
_WIDTH = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
BEIT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16
)  # ViT-B/16


def tiny_beit(**overrides) -> BeitConfig:
    return BeitConfig(**{**_WIDTH, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8, **overrides})


def tiny_vqkd(**overrides) -> VQKDConfig:
    """A 32 px tokenizer with 8 px patches (a 4x4 grid) and 16 codes."""
    return VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **_WIDTH),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **_WIDTH),
        codebook_size=16, code_dim=8, teacher_dim=16, kmeans_init=False, **overrides,
    )  # fmt: skip


def tiny_config(kind: str):
    if kind == "vqkd":
        return tiny_vqkd()
    if kind == "mim":
        return BeitV2Config(**_WIDTH, num_hidden_layers=4, early_layers=2, image_size=32, patch_size=8, vocab_size=16)
    if kind == "classifier":
        return tiny_beit(num_labels=3, use_mean_pooling=True, use_relative_position_bias=True)
    if kind == "feature_extractor":
        return tiny_beit(use_mean_pooling=False, use_relative_position_bias=True)
    if kind == "segmentation":
        return UperNetConfig(backbone_config=tiny_beit(num_hidden_layers=4, out_indices=[0, 1, 2, 3]), num_labels=5)
    if kind == "dvae":
        return DVAEConfig(image_size=32, codebook_size=16, hidden_size=8)
    return VQKDPixelDecoderConfig(codebook_size=16, code_dim=8, image_size=32, patch_size=8, hidden_size=32)


def _usage_snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}\n")[1].split("\n## ")[0]


@pytest.mark.parametrize("kind", CARD_KINDS)
def test_every_kind_parses_with_its_measured_metrics_only(kind, tmp_path):
    measured, index_entries = MEASURED[kind]
    path = write_model_card(
        tmp_path / "out",
        kind,
        config=tiny_config(kind),
        hub_model_id=HUB_ID,
        license="apache-2.0",
        base_model="someone/beitv2-tiny-base",
        datasets=["someone/tiny-images"],
        training_args={"learning_rate": 5e-4, "num_train_epochs": 100},
        metrics={**TRAINING_NOISE, **measured},
        tags=["demo"],
    )
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == PIPELINE_TAGS[kind]
    assert data.datasets == ["someone/tiny-images"] and data.base_model == "someone/beitv2-tiny-base"
    assert "demo" in data.tags and {"beit", "beitv2"} & set(data.tags)
    assert "${" not in card.text and "$" not in card.text.replace("$ ", "")  # every placeholder filled

    # model-index: one entry per measured metric of this model, with its value, task and evaluation data.
    results = data.eval_results or []
    by_name = {next(n for n, v in measured.items() if v == r.metric_value): r for r in results}
    assert set(by_name) == set(index_entries) and len(results) == len(index_entries)
    for name, result in by_name.items():
        assert (result.task_type, result.metric_type) == index_entries[name]
        assert result.dataset_type == "someone/tiny-images" and result.metric_name
    if not results:
        assert "model-index" not in card.content

    # The measured table has the measured numbers (baselines included), and nothing from the training loop.
    table = _section(card.text, "Results measured by this project")
    for name, value in measured.items():
        assert f"| {name} | {value:.6g} |" in table
    for name, value in TRAINING_NOISE.items():
        assert f"| {name} |" not in card.text and f"{value:.6g}" not in card.content, name
    assert "| learning_rate | 0.0005 |" in _section(card.text, "Training")


def test_paper_and_measured_numbers_stay_apart():
    base = BeitConfig(**BEIT_BASE)
    card = build_model_card(
        "classifier", config=base, model_name="ft", family="beitv2", metrics={"eval_accuracy": 0.8123}
    ).text
    measured = _section(card, "Results measured by this project")
    paper = _section(card, "Results reported in the paper")
    assert "0.8123" in measured and "0.8123" not in paper and "paper" not in measured.lower()
    assert "85.0" in paper and "85.0" not in measured and "reported by the paper" in paper
    assert "52.7" not in paper  # ADE20K rows describe a segmenter, not a classifier


def test_paper_rows_need_a_preset_match_not_a_name():
    # A tiny model named like a base one gets no paper numbers: size comes from the config, never a name.
    tiny = build_model_card("classifier", config=tiny_beit(), model_name="beitv2-base-patch16-224", family="beitv2")
    assert "The paper reports no numbers for this configuration." in tiny.text
    assert "| size_preset | custom |" in tiny.text

    mim_base = BeitV2Config.from_preset("base")  # family from the config: aggregation head -> BEiT v2
    assert "85.0" in build_model_card("mim", config=mim_base, model_name="m").text
    v1 = BeitV2Config.from_preset("base", use_patch_aggregation=False)  # BEiT v1 masked image modeling
    assert "83.2" in build_model_card("mim", config=v1, model_name="m").text
    base_8px = BeitV2Config.from_preset("base", patch_size=8)  # the paper's models all use 16 px patches
    assert "reported by the paper" not in build_model_card("mim", config=base_8px, model_name="m").text

    segmenter = UperNetConfig(backbone_config=BeitConfig(**{**BEIT_BASE, "out_indices": [3, 5, 7, 11]}))
    paper = _section(build_model_card("segmentation", config=segmenter, model_name="s", family="beitv2").text,
                     "Results reported in the paper")  # fmt: skip
    assert "52.7" in paper and "85.0" not in paper

    tokenizer = build_model_card("vqkd", config=VQKDConfig.from_preset("base-decoder3"), model_name="t").text
    assert "| size_preset | base-decoder3 |" in tokenizer and "0.145" in tokenizer and "0.164" not in tokenizer
    other_codebook = VQKDConfig.from_preset("base-decoder3", codebook_size=1024)
    assert "0.145" not in build_model_card("vqkd", config=other_codebook, model_name="t").text


def test_sizes_come_from_the_config():
    card = build_model_card("vqkd", config=tiny_vqkd(), model_name="tok").text
    assert "maps each 8x8 patch of a 32 px image to one of 16 codes" in card
    architecture = _section(card, "Architecture")
    for row in ("| image_size | 32 |", "| patch_size | 8 |", "| patch_grid | 4x4 |", "| codebook_size | 16 |",
                "| decoder_layers | 1 |", "| num_hidden_layers | 2 |"):  # fmt: skip
        assert row in architecture, row
    assert "224" not in card and "16x16" not in card

    segmenter = build_model_card("segmentation", config=tiny_config("segmentation"), model_name="s").text
    assert "| patch_size | 8 |" in segmenter and "| num_labels | 5 |" in segmenter
    dvae = build_model_card("dvae", config=tiny_config("dvae"), model_name="d").text
    assert "| patch_size | 8 |" in dvae and "| patch_grid | 4x4 |" in dvae and "one of\n16 codes" in dvae


def test_snippet_loads_the_hub_id_or_a_marked_placeholder(tmp_path):
    output_dir = tmp_path / "runs" / "my-tokenizer"
    card = ModelCard.load(write_model_card(output_dir, "vqkd", config=tiny_vqkd()))
    assert str(tmp_path) not in card.content  # no local path anywhere, snippet included
    snippet = _usage_snippet(card.text)
    assert f'from_pretrained("{HUB_ID_PLACEHOLDER}"' in snippet
    assert "Upload this folder first" in card.text and card.text.startswith("\n# my-tokenizer")

    card = ModelCard.load(write_model_card(output_dir, "vqkd", config=tiny_vqkd(), hub_model_id=HUB_ID))
    assert f'from_pretrained("{HUB_ID}"' in _usage_snippet(card.text)
    assert HUB_ID_PLACEHOLDER not in card.text and "Upload this folder first" not in card.text
    assert card.text.startswith("\n# beitv2-tiny-demo")

    with pytest.raises(ValueError, match="hub_model_id must be a Hub repo id .* not a local path"):
        write_model_card(output_dir, "vqkd", config=tiny_vqkd(), hub_model_id=str(output_dir))
    with pytest.raises(ValueError, match="base_model must be a Hub repo id .* not a local path"):
        write_model_card(output_dir, "vqkd", config=tiny_vqkd(), base_model=str(tmp_path / "teacher" / "ckpt"))


def test_hub_reference_keeps_hub_ids_only(tmp_path):
    assert hub_reference("microsoft/beit-base-patch16-224") == "microsoft/beit-base-patch16-224"
    assert (
        hub_reference(str(tmp_path)) is None and hub_reference("../models/x/y") is None and hub_reference(None) is None
    )


def test_license_is_the_callers_choice(tmp_path):
    config = tiny_config("classifier")
    card = ModelCard.load(write_model_card(tmp_path, "classifier", config=config, license="cc-by-nc-4.0"))
    assert card.data.license == "cc-by-nc-4.0" and "`cc-by-nc-4.0`" in _section(card.text, "License")
    card = ModelCard.load(write_model_card(tmp_path, "classifier", config=config))
    assert card.data.license is None and "license" not in card.data.to_dict()
    assert "No license was declared" in _section(card.text, "License")
    for kind in CARD_KINDS:  # no template hard-codes one
        assert "license" not in split_front_matter((TEMPLATES_DIR / f"{kind}.md").read_text())[0], kind
    with pytest.raises(ValueError, match="license must be a Hub license id .* got 'MIT License'"):
        write_model_card(tmp_path, "classifier", config=config, license="MIT License")


def test_license_and_hub_id_are_checked_with_the_arguments():
    from pretraining.arguments import PretrainingArguments

    assert PretrainingArguments(output_dir="out", license="apache-2.0").license == "apache-2.0"
    assert PretrainingArguments(output_dir="out").license is None
    with pytest.raises(ValueError, match="license must be a Hub license id"):
        PretrainingArguments(output_dir="out", license="Apache 2.0")
    with pytest.raises(ValueError, match="not a local path"):
        PretrainingArguments(output_dir="out", hub_model_id="/data/runs/out")


def test_bad_arguments_are_named():
    config = tiny_config("classifier")
    with pytest.raises(ValueError, match="Unknown model card kind 'detector'"):
        build_model_card("detector", config=config, model_name="m")
    with pytest.raises(ValueError, match="A 'vqkd' card describes a 'beitv2_vqkd' model, but the config is a 'beit'"):
        build_model_card("vqkd", config=config, model_name="m")
    with pytest.raises(ValueError, match="Unknown family 'beit3'"):
        build_model_card("classifier", config=config, model_name="m", family="beit3")
    with pytest.raises(ValueError, match="front-matter"):
        split_front_matter("# no metadata")


def test_export_model_writes_a_card_the_hub_parses(tmp_path, fresh_accelerator_state):
    """End to end through the pretraining scripts' export: `--license`, `--hub_model_id` and the run's last metrics
    (training-loop numbers mixed with evaluation ones, as `run_vqkd.py` keeps them) reach a parseable card."""
    from accelerate import Accelerator

    from modeling_beitv2 import VQKDModel
    from pretraining.arguments import PretrainingArguments
    from pretraining.loop import export_model

    args = PretrainingArguments(output_dir=str(tmp_path / "out"), license="apache-2.0", hub_model_id=HUB_ID)
    measured = MEASURED["vqkd"][0]
    export_model(
        Accelerator(cpu=True),
        VQKDModel(tiny_vqkd()),
        VQKDImageProcessor(image_size=32),
        args.output_dir,
        card_kind="vqkd",
        card_fields={"teacher": hub_reference("openai/clip-vit-base-patch16")},
        dataset_name="someone/tiny-images",
        training_card={"steps": 17, "total_batch_size": 8, "peak_learning_rate": 1e-3, **args.card_settings()},
        last_metrics={**TRAINING_NOISE, **measured},
        license=args.license,
        hub_model_id=args.hub_model_id,
        repo_id=None,  # no upload; the card still names the id given with --hub_model_id
        token=None,
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["someone/tiny-images"]
    assert {r.metric_value for r in card.data.eval_results} == set(measured.values())
    assert f'from_pretrained("{HUB_ID}"' in _usage_snippet(card.text) and str(tmp_path) not in card.content
    assert "8x8 patch of a 32 px image" in card.text and "openai/clip-vit-base-patch16" in card.text
    assert "| steps | 17 |" in card.text and "images_per_second" not in card.text


def _exec_snippet(card: str, replacements: dict[str, str], tmp_path, monkeypatch) -> dict:
    """Run a card's usage snippet with its Hub ids pointed at local folders (no network here)."""
    snippet = _usage_snippet(card)
    for hub_id, folder in replacements.items():
        assert f'"{hub_id}"' in snippet
        snippet = snippet.replace(f'"{hub_id}"', repr(str(folder)))
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with torch.no_grad():
        exec(snippet, namespace)
    return namespace


def test_classifier_snippet_runs(tmp_path, monkeypatch):
    config = tiny_config("classifier")
    model_dir = tmp_path / "beit-tiny-ft"
    BeitForImageClassification(config).save_pretrained(model_dir)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(model_dir)
    card = build_model_card("classifier", config=config, model_name="m", hub_model_id=HUB_ID).text
    namespace = _exec_snippet(card, {HUB_ID: model_dir}, tmp_path, monkeypatch)
    assert namespace["predictions"][0]["label"] in config.id2label.values()


@pytest.mark.parametrize("saved_by", ["run_mim", "converter"])
def test_mim_snippet_runs(tmp_path, monkeypatch, tiny_beitv2_kwargs, saved_by):
    from modeling_beitv2 import BeitV2ForMaskedImageModeling

    model_dir = tmp_path / "mim"
    config = BeitV2Config(**tiny_beitv2_kwargs)
    BeitV2ForMaskedImageModeling(config).save_pretrained(model_dir)
    # run_mim.py saves its masking processor (custom code, which also returns a mask and a tokenizer view); the
    # converter saves a native BeitImageProcessor. The snippet must work with both.
    if saved_by == "run_mim":
        BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=32).save_pretrained(model_dir)
    else:
        BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(model_dir)
    card = build_model_card("mim", config=config, model_name="m", hub_model_id=HUB_ID).text
    namespace = _exec_snippet(card, {HUB_ID: model_dir}, tmp_path, monkeypatch)
    assert namespace["predicted_tokens"].shape == (8,)  # half of the 16 patches masked
    assert len(namespace["embedding"][0]) == 32  # the pipeline's pooled features: hidden_size


def test_feature_extractor_snippet_runs_without_custom_code(tmp_path, monkeypatch, tiny_beitv2_kwargs):
    from run_mim import export_feature_extractor

    from modeling_beitv2 import BeitV2ForMaskedImageModeling

    mim_dir = tmp_path / "mim"
    BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).save_pretrained(mim_dir)
    processor = BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=32)
    folder = export_feature_extractor(mim_dir, processor, hub_model_id=HUB_ID, license="mit")
    card = (folder / "README.md").read_text()
    assert f'model="{HUB_ID}-feature-extraction"' in card and f"base_model: {HUB_ID}" in card
    namespace = _exec_snippet(card, {f"{HUB_ID}-feature-extraction": folder}, tmp_path, monkeypatch)
    assert len(namespace["tokens"][0]) == 17 and len(namespace["embedding"][0]) == 32


def test_vqkd_and_pixel_decoder_snippets_run(tmp_path, monkeypatch):
    from modeling_beitv2 import VQKDModel, VQKDPixelDecoder

    tokenizer = VQKDModel(tiny_vqkd())
    tokenizer_dir = tmp_path / "vqkd"
    tokenizer.save_pretrained(tokenizer_dir)
    VQKDImageProcessor(image_size=32).save_pretrained(tokenizer_dir)  # what run_vqkd.py saves (custom code)
    card = build_model_card("vqkd", config=tokenizer.config, model_name="t", hub_model_id=HUB_ID).text
    namespace = _exec_snippet(card, {HUB_ID: tokenizer_dir}, tmp_path, monkeypatch)
    assert namespace["codes"].shape == (1, 16) and int(namespace["codes"].max()) < 16

    decoder = VQKDPixelDecoder.from_tokenizer(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    decoder_dir = tmp_path / "decoder"
    decoder.save_pretrained(decoder_dir)
    tokenizer_id = "someone/tiny-vqkd"
    card = build_model_card(
        "pixel_decoder", config=decoder.config, model_name="p", hub_model_id=HUB_ID, base_model=tokenizer_id
    ).text
    namespace = _exec_snippet(card, {HUB_ID: decoder_dir, tokenizer_id: tokenizer_dir}, tmp_path, monkeypatch)
    assert namespace["pixels"].shape == (1, 3, 32, 32)


def test_trainer_scripts_card_has_license_hub_id_and_last_evaluation(tmp_path):
    """The fine-tuning scripts' path: `model_card_kwargs` (with `--license`) at construction, then
    `LayerDecayTrainer.create_model_card` with the fine-tuned config and the last evaluation's metrics."""
    from transformers import TrainingArguments

    from finetuning.trainer import LayerDecayTrainer, model_card_kwargs

    source = tmp_path / "local-mim"  # a local checkpoint: neither base_model nor the card may name its path
    BeitV2Config(**_WIDTH, num_hidden_layers=4, early_layers=2, image_size=32, patch_size=8).save_pretrained(source)
    card_kwargs = model_card_kwargs(str(source), "someone/tiny-images", {"layer_decay": 0.65}, license="apache-2.0")
    trainer = LayerDecayTrainer(
        model=BeitForImageClassification(tiny_config("classifier")),
        args=TrainingArguments(output_dir=str(tmp_path / "ft"), hub_model_id=HUB_ID, report_to=[]),
        model_card={"kind": "classifier", **card_kwargs},
    )
    trainer.state.log_history = [
        {"loss": 1.5, "learning_rate": 0.000123457, "grad_norm": 3.14159, "epoch": 1.0, "step": 10},
        {"eval_accuracy": 0.5, "eval_loss": 1.23232, "eval_runtime": 12.3456, "epoch": 1.0, "step": 10},
        {"eval_accuracy": 0.6667, "eval_top5_accuracy": 1.0, "eval_loss": 1.1, "epoch": 2.0, "step": 20},
    ]
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "ft" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert card.data.pipeline_tag == "image-classification" and card.data.datasets == ["someone/tiny-images"]
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        ("Top-1 accuracy", 0.6667),
        ("Top-5 accuracy", 1.0),
    }
    assert f'model="{HUB_ID}"' in _usage_snippet(card.text) and str(tmp_path) not in card.content
    assert "| layer_decay | 0.65 |" in card.text and "3.14159" not in card.text and "12.3456" not in card.text

    with pytest.raises(ValueError, match="license must be a Hub license id"):
        model_card_kwargs(str(source), None, {}, license="Apache License 2.0")
    with pytest.raises(ValueError, match="not a local path"):
        LayerDecayTrainer(
            model=BeitForImageClassification(tiny_config("classifier")),
            args=TrainingArguments(output_dir=str(tmp_path / "ft"), hub_model_id=str(tmp_path / "ft"), report_to=[]),
            model_card={"kind": "classifier", **card_kwargs},
        )


def test_converter_license_option():
    from convert_unilm_checkpoint import parse_args

    required = ["--kind", "vqkd", "--checkpoint", "vqkd.pth", "--output_dir", "out"]
    assert parse_args(required).license == "mit"  # the official releases' license (microsoft/unilm is MIT)
    assert parse_args([*required, "--license", "apache-2.0"]).license == "apache-2.0"
    with pytest.raises(SystemExit):
        parse_args([*required, "--license", "MIT License"])
    with pytest.raises(SystemExit):
        parse_args([*required, "--hub_model_id", "/models/out"])
