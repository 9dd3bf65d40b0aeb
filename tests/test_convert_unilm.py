"""Checkpoint conversion: key accounting, lossless round trips, shape inference, clear errors, the CLI.

The official code cannot live in this repository, so checkpoints in the official layouts are written here by
`_to_unilm`, an independent inverse of the conversion (fuse q/k/v, rename). Classifiers are compared with
transformers' own `BeitForImageClassification`, an implementation that owes nothing to this project.
"""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch
from convert_unilm_checkpoint import conversion_image_processor
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForImageClassification

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling
from modeling_beitv2.convert_unilm import EvaluationPreprocessing, convert_checkpoint, save_conversion
from modeling_beitv2.key_accounting import KeyAccountant
from modeling_beitv2.vit_shapes import (
    NamePreset,
    ViTShapes,
    backbone_config_kwargs,
    infer_vit_shapes,
    resolve_num_heads,
)

torch.manual_seed(0)


def _to_unilm(state_dict: dict[str, torch.Tensor], prefix: str = "beit.") -> dict[str, torch.Tensor]:
    """Rewrite transformers-BEiT names (in memory) into the unilm/timm layout."""
    out = {}
    layer_names = {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "attention.o_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "relative_position_bias": "attn",  # + ".relative_position_bias_table"
        "lambda_1": "gamma_1",
        "lambda_2": "gamma_2",
    }
    top_names = {
        f"{prefix}embeddings.cls_token": "cls_token",
        f"{prefix}embeddings.mask_token": "mask_token",
        f"{prefix}embeddings.position_embeddings": "pos_embed",
        f"{prefix}embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        f"{prefix}embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        f"{prefix}shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
        f"{prefix}pooler.layernorm.weight": "fc_norm.weight",
        f"{prefix}pooler.layernorm.bias": "fc_norm.bias",
        f"{prefix}layernorm.weight": "norm.weight",
        f"{prefix}layernorm.bias": "norm.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
        "lm_head.weight": "lm_head.weight",
        "lm_head.bias": "lm_head.bias",
        "aggregation_head.layernorm.weight": "cls_pt_norm.weight",
        "aggregation_head.layernorm.bias": "cls_pt_norm.bias",
        "aggregation_head.lm_head.weight": "cls_pt_lm_head.weight",
        "aggregation_head.lm_head.bias": "cls_pt_lm_head.bias",
    }
    for key, value in state_dict.items():
        if key in top_names:
            out[top_names[key]] = value
            continue
        for source, target in ((f"{prefix}layers.", "blocks."), ("aggregation_head.layers.", "cls_pt_layers.")):
            if key.startswith(source):
                index, rest = key[len(source) :].split(".", 1)
                block = f"{target}{index}."
                if rest.startswith("attention.q_proj"):
                    if rest.endswith("weight"):
                        names = ("q_proj", "k_proj", "v_proj")
                        stem = f"{source}{index}.attention."
                        out[block + "attn.qkv.weight"] = torch.cat([state_dict[stem + n + ".weight"] for n in names])
                    else:
                        out[block + "attn.q_bias"] = value
                elif rest == "attention.v_proj.bias":
                    out[block + "attn.v_bias"] = value
                elif rest.startswith(("attention.k_proj", "attention.v_proj")):
                    pass  # fused into qkv above
                else:
                    name, parameter = rest.rsplit(".", 1) if not rest.startswith("lambda") else (rest, "")
                    out[block + layer_names[name] + (f".{parameter}" if parameter else "")] = value
                break
        else:
            raise AssertionError(f"test helper does not know {key}")
    return out


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def _tiny_classifier(**overrides) -> BeitForImageClassification:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        num_labels=5,
    )
    return _perturbed(BeitForImageClassification(BeitConfig(**{**kwargs, **overrides})))


def _tiny_mim(tiny_beitv2_kwargs, **overrides) -> BeitV2ForMaskedImageModeling:
    return _perturbed(BeitV2ForMaskedImageModeling(BeitV2Config(**{**tiny_beitv2_kwargs, **overrides})))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # BEiT v2 fine-tuned: mean pooling, per-layer relative bias, layer scale
        dict(
            use_mean_pooling=False,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=True,
            use_absolute_position_embeddings=True,
            layer_scale_init_value=0.0,
        ),
    ],
    ids=["meanpool-per-layer-bias", "cls-shared-bias-abs-pos"],
)
def test_finetuned_matches_native_beit(tmp_path, overrides):
    native = _tiny_classifier(**overrides)
    path = tmp_path / "beitv2_base_patch16_224_ft.pth"
    # DeepSpeed wraps the weights under "module"; relative_position_index buffers are derived and dropped.
    unilm = _to_unilm(native.state_dict())
    unilm["blocks.0.attn.relative_position_index"] = torch.zeros(3, dtype=torch.long)
    torch.save({"module": unilm, "epoch": 3}, path)

    result = convert_checkpoint("finetuned", path, image_size=32)
    out_dir = save_conversion(result, tmp_path / "out")
    conversion_image_processor(result.preprocessing).save_pretrained(out_dir)
    reloaded, info = BeitForImageClassification.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = native(pixel_values=pixel_values).logits
        actual = reloaded.eval()(pixel_values=pixel_values).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert reloaded.config.num_attention_heads == 4  # read from the relative position bias table
    processor = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]  # BEiT v2 by its file name
    assert processor["crop_size"] == {"height": 32, "width": 32}


@pytest.mark.parametrize(
    ("image_size", "patch_size", "shortest_edge"),
    [(224, 32, 256), (64, 16, 64)],  # 224 / 0.875 = 256; other sizes: the size itself, then the centre crop
)
def test_classifier_preprocessing_is_the_reference_evaluation(tmp_path, image_size, patch_size, shortest_edge):
    native = _tiny_classifier(image_size=image_size, patch_size=patch_size)
    path = tmp_path / "beit_base_patch16_224_ft.pth"
    torch.save(_to_unilm(native.state_dict()), path)
    processor = conversion_image_processor(convert_checkpoint("finetuned", path).preprocessing)
    assert processor.size == {"shortest_edge": shortest_edge} and processor.do_center_crop
    assert processor.crop_size == {"height": image_size, "width": image_size}
    assert processor.resample == PIL.Image.BICUBIC
    assert list(processor.image_mean) == [0.5] * 3  # BEiT v1 by its file name


def test_dvae_preprocessing_resizes_with_lanczos():
    processor = conversion_image_processor(EvaluationPreprocessing(112, None, crop_pct=None, resample="lanczos"))
    assert processor.resample == PIL.Image.LANCZOS and processor.size == {"height": 112, "width": 112}
    assert list(processor.image_mean) == [0.0] * 3 and list(processor.image_std) == [1.0] * 3


def test_named_sizes_come_from_the_preset_tables():
    shapes = ViTShapes(1024, 24, 4096, 16, 3, None, None, True, False, True, False)
    # The released sizes all use 64-wide heads; a table entry wins where its width matches.
    table = {"large": {"hidden_size": 1024, "num_attention_heads": 8}}
    assert resolve_num_heads(shapes, NamePreset(size="large"), None, "test", sizes=table) == 8
    assert resolve_num_heads(shapes, NamePreset(size="base"), None, "test", sizes=table) == 16  # 1024 / 64
    # Layer scale: BEITV2_PRESETS' value for the named size (large: 1e-5), BeitV2Config's default otherwise.
    assert backbone_config_kwargs(shapes, NamePreset(size="large"), 16, 224)["layer_scale_init_value"] == 1e-5
    assert backbone_config_kwargs(shapes, NamePreset(size="base"), 16, 224)["layer_scale_init_value"] == 0.1
    no_layer_scale = ViTShapes(1024, 24, 4096, 16, 3, None, None, False, False, True, False)
    assert backbone_config_kwargs(no_layer_scale, NamePreset(size="large"), 16, 224)["layer_scale_init_value"] == 0


def test_timm_state_dict_safetensors_with_zero_k_bias(tmp_path):
    native = _tiny_classifier()
    timm_layout = _to_unilm(native.state_dict())
    for i in range(2):
        timm_layout[f"blocks.{i}.attn.k_bias"] = torch.zeros(32)
    path = tmp_path / "beit_base_patch16_224.safetensors"
    save_file(timm_layout, str(path))
    result = convert_checkpoint("timm", path)
    torch.testing.assert_close(result.model.state_dict(), native.state_dict(), rtol=0, atol=0)
    assert list(conversion_image_processor(result.preprocessing).image_mean) == [0.5] * 3  # BEiT v1 by file name

    timm_layout["blocks.1.attn.k_bias"] = torch.ones(32)
    save_file(timm_layout, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.k_bias is not zero"):
        convert_checkpoint("timm", path)


@pytest.mark.parametrize("shared_lm_head", [True, False])
def test_beitv2_pretrain_round_trip(tmp_path, tiny_beitv2_kwargs, shared_lm_head):
    model = _tiny_mim(tiny_beitv2_kwargs, early_layers=1, shared_lm_head=shared_lm_head)
    unilm = _to_unilm(model.state_dict())
    path = tmp_path / "pretrain.pth"
    torch.save({"model": unilm}, path)

    # early_layers is not stored: the default is depth - 3, the override wins.
    assert convert_checkpoint("beitv2_pretrain", path).model.config.early_layers == 1  # depth 4 - 3
    result = convert_checkpoint("beitv2_pretrain", path, early_layers=1)
    assert result.model.config.shared_lm_head is shared_lm_head
    torch.testing.assert_close(result.model.state_dict(), model.state_dict(), rtol=0, atol=0)
    pixel_values = torch.randn(2, 3, 32, 32)
    bool_masked_pos = torch.rand(2, 16) < 0.4
    bool_masked_pos[:, 0] = True
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
        actual = result.model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.aggregation_logits, expected.aggregation_logits, rtol=0, atol=0)

    # MIM models see the whole image resized, normalised as their family (BEiT v2: ImageNet's statistics).
    assert result.preprocessing == EvaluationPreprocessing(32, "beitv2", crop_pct=None, resample="bicubic")
    out_dir = save_conversion(result, tmp_path / "out")
    reloaded = BeitV2ForMaskedImageModeling.from_pretrained(out_dir)
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_beit_pretrain_and_kind_mismatch(tmp_path, tiny_beitv2_kwargs):
    v1 = _tiny_mim(tiny_beitv2_kwargs, use_patch_aggregation=False)
    v1_path = tmp_path / "beit_v1.pth"
    torch.save({"model": _to_unilm(v1.state_dict())}, v1_path)
    result = convert_checkpoint("beit_pretrain", v1_path)
    assert result.model.config.use_patch_aggregation is False
    torch.testing.assert_close(result.model.state_dict(), v1.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="--kind beit_pretrain"):
        convert_checkpoint("beitv2_pretrain", v1_path)

    v2_path = tmp_path / "beit_v2.pth"
    torch.save({"model": _to_unilm(_tiny_mim(tiny_beitv2_kwargs).state_dict())}, v2_path)
    with pytest.raises(ValueError, match="--kind beitv2_pretrain"):
        convert_checkpoint("beit_pretrain", v2_path)
    with pytest.raises(ValueError, match="no classification head"):
        convert_checkpoint("finetuned", v2_path)
    with pytest.raises(ValueError, match="early_layers only applies"):
        convert_checkpoint("finetuned", v2_path, early_layers=3)
    with pytest.raises(ValueError, match="Unknown kind 'beit3'"):
        convert_checkpoint("beit3", v2_path)


def test_unknown_and_missing_keys_are_listed(tmp_path):
    unilm = _to_unilm(_tiny_classifier().state_dict())
    unilm["blocks.0.attn.extra_scale"] = torch.ones(1)
    del unilm["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "broken.pth"
    torch.save(unilm, path)
    with pytest.raises(ValueError) as error:
        convert_checkpoint("finetuned", path)
    message = str(error.value)
    assert "1 unknown key(s): ['blocks.0.attn.extra_scale']" in message
    assert "1 missing key(s): ['blocks.1.mlp.fc2.bias']" in message


def test_key_accountant_drops_only_derived_keys():
    accountant = KeyAccountant(
        {"a": torch.ones(1), "x.relative_position_index": torch.ones(1), "b": torch.ones(1)},
        drop_patterns=[r"relative_position_index$"],
    )
    assert accountant.take("a").item() == 1
    with pytest.raises(ValueError, match=r"unknown key\(s\): \['b'\].*missing key\(s\): \['c'\]"):
        accountant.take("c")
        accountant.finish()


def test_shape_inference_and_overrides(tmp_path):
    unilm = _to_unilm(_tiny_classifier(num_hidden_layers=3, num_attention_heads=2, image_size=48).state_dict())
    shapes = infer_vit_shapes(unilm)
    assert (shapes.hidden_size, shapes.num_hidden_layers, shapes.intermediate_size) == (32, 3, 64)
    assert (shapes.patch_size, shapes.grid_size, shapes.num_attention_heads) == (8, 6, 2)
    assert shapes.layer_scale and shapes.per_layer_relative_position_bias and not shapes.shared_relative_position_bias

    path = tmp_path / "model.pth"
    torch.save({"state_dict": unilm}, path)
    assert convert_checkpoint("finetuned", path).model.config.image_size == 48
    with pytest.raises(ValueError, match="contradicts .* 2 heads"):
        convert_checkpoint("finetuned", path, num_attention_heads=4)
    with pytest.raises(ValueError, match="image_size=224 does not match .* 6x6 patches of 8 px"):
        convert_checkpoint("finetuned", path, image_size=224)

    assert NamePreset.from_name("ckpt/beitv2_large_patch16_224_pt1k.pth") == NamePreset("beitv2", "large", 16, 224)
    assert NamePreset.from_name("vqkd_encoder.pth") == NamePreset()


def test_cli_writes_loadable_folder_and_card(tmp_path):
    from convert_unilm_checkpoint import main

    from pretraining.model_cards import split_front_matter

    native = _tiny_classifier()
    path = tmp_path / "beitv2_base_patch16_224_pt1k_ft1k.pth"
    torch.save({"model": _to_unilm(native.state_dict())}, path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(5)}))
    out_dir = main(
        [
            "--kind",
            "finetuned",
            "--checkpoint",
            str(path),
            "--output_dir",
            str(tmp_path / "ft"),
            "--id2label",
            str(labels),
        ]
    )
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= {
        p.name for p in out_dir.iterdir()
    }
    model = BeitForImageClassification.from_pretrained(out_dir)
    assert model.config.id2label[3] == "class_3"
    metadata, body = split_front_matter((out_dir / "README.md").read_text())
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["license"] == "mit" and path.name in body  # --license default, provenance of the weights
    # The paper's numbers follow the converted config's size, not the "base" in the file name of this tiny model.
    assert "85.0" not in body and "The paper reports no numbers" in body


def _vqkd_to_unilm(model) -> dict[str, torch.Tensor]:
    state_dict = model.state_dict()
    out = {}
    for part in ("encoder", "decoder"):
        sub = {k: v for k, v in state_dict.items() if k.startswith(f"{part}.")}
        for key, value in _to_unilm(sub, prefix=f"{part}.").items():
            key = "fc_norm." + key[len("norm.") :] if key.startswith("norm.") else key
            out[f"{part}.{key}"] = value
    for key, value in state_dict.items():
        if "task_layer" in key:
            out[key] = value
    out["quantize.embedding.weight"] = state_dict["quantizer.codebook"]
    out["quantize.cluster_size"] = state_dict["quantizer.cluster_size"]
    out["quantize.embedding.initted"] = torch.tensor([1.0])
    out["quantize.embedding.cluster_size"] = torch.zeros(64)  # unused by the reference: dropped by name
    out["quantize.embedding.embed_avg"] = torch.zeros(64, 32)
    out["teacher_model.visual.proj"] = torch.zeros(2, 2)  # the frozen teacher: dropped by name
    return out


def test_vqkd_round_trip(tmp_path):
    from modeling_beitv2 import VQKDConfig, VQKDModel
    from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

    width = dict(hidden_size=64, intermediate_size=128)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config(image_size=32, **width, num_hidden_layers=2, num_attention_heads=1),
        decoder_config=vqkd_decoder_config(grid_size=2, **width, num_layers=1, num_attention_heads=2),
        codebook_size=64,
    )
    model = _perturbed(VQKDModel(config))
    model.quantizer.cluster_size.uniform_()
    model.quantizer.initted.fill_(True)  # a released tokenizer is trained
    path = tmp_path / "vqkd_encoder_decoder_1x64x2_clip.pth"
    torch.save({"model": _vqkd_to_unilm(model)}, path)
    result = convert_checkpoint("vqkd", path)
    assert result.model.config.decoder_config.num_hidden_layers == 1
    assert result.model.config.encoder_config.num_attention_heads == 1  # 64-wide heads, as every released model
    assert result.model.config.decoder_config.num_attention_heads == 2  # from "decoder_1x64x2" in the name
    for vit in (result.model.config.encoder_config, result.model.config.decoder_config):
        assert vit.drop_path_rate == 0.0 and vit.layer_scale_init_value == 0.0  # trains like a new tokenizer
    torch.testing.assert_close(result.model.state_dict(), model.state_dict(), rtol=0, atol=0)
    # The saved image processor gives plain [0, 1] pixels, the whole image resized: the tokenizer maps them to its
    # [-1, 1] itself.
    processor = conversion_image_processor(result.preprocessing)
    assert list(processor.image_mean) == [0.0] * 3 and list(processor.image_std) == [1.0] * 3
    assert processor.size == {"height": 32, "width": 32} and not processor.do_center_crop
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(result.model.get_codebook_indices(pixels), model.get_codebook_indices(pixels))
