"""Tokenizer configs: presets at any patch size, and sub-configs that load as what they are."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig, BeitConfig
from transformers.testing_utils import CaptureLogger

from modeling_beitv2 import VQKDConfig, VQKDDecoderConfig, VQKDEncoderConfig, VQKDModel


def test_vqkd_preset_takes_the_encoders_patch_size():
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=56, patch_size=14)
    encoder, decoder = config.encoder_config, config.decoder_config
    assert (encoder.image_size, encoder.patch_size, encoder.hidden_size) == (56, 14, 192)
    assert (decoder.image_size, decoder.patch_size, decoder.num_hidden_layers) == (4, 1, 1)  # the 4x4 grid of codes
    assert VQKDConfig.from_preset("base-decoder3").encoder_config.patch_size == 16  # the paper's default
    with pytest.raises(ValueError, match="image_size 50 is not a multiple of patch_size 14"):
        VQKDConfig.from_preset("tiny-decoder1", image_size=50, patch_size=14)


def test_a_vqkd_folder_is_no_beit_config(tmp_path):
    """Loaded as a `BeitConfig`, a VQ-KD folder gets transformers' mismatched-model-type warning (it used to give one
    of its two ViTs, silently); each sub-config class reads its own part."""
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=32, codebook_size=64, kmeans_init=False)
    config.save_pretrained(tmp_path)
    logger = transformers.utils.logging.get_logger("transformers.configuration_utils")
    with CaptureLogger(logger) as captured:
        BeitConfig.from_pretrained(tmp_path)
    assert "You are using a model of type `beitv2_vqkd` to instantiate a model of type `beit`" in captured.out
    encoder, decoder = VQKDEncoderConfig.from_pretrained(tmp_path), VQKDDecoderConfig.from_pretrained(tmp_path)
    assert (encoder.num_hidden_layers, encoder.patch_size) == (12, 16)
    assert (decoder.num_hidden_layers, decoder.patch_size, decoder.num_channels) == (1, 1, config.code_dim)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded.encoder_config, VQKDEncoderConfig)
    assert reloaded.encoder_config.to_dict() == config.encoder_config.to_dict()


def test_a_plain_beit_sub_config_is_taken_as_the_tokenizers_own():
    encoder = BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    config = VQKDConfig(encoder_config=encoder, codebook_size=64, kmeans_init=False)
    assert isinstance(config.encoder_config, VQKDEncoderConfig)
    assert config.encoder_config.hidden_size == 32 and config.encoder_config.patch_size == 8


def test_fp32_modules_stay_fp32_in_a_half_precision_tokenizer(tmp_path):
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=32, codebook_size=64, kmeans_init=False)
    built = VQKDModel._from_config(config, dtype=torch.float16)
    VQKDModel(config).save_pretrained(tmp_path)
    loaded = VQKDModel.from_pretrained(tmp_path, dtype=torch.float16)
    for model in (built, loaded):
        dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        assert {dtypes[n] for n in dtypes if n.startswith(("encode_task_layer.", "quantizer."))} <= {
            torch.float32,
            torch.bool,
        }
        assert dtypes["quantizer.initted"] == torch.bool
        assert dtypes["encoder.embeddings.cls_token"] == dtypes["decode_task_layer.0.weight"] == torch.float16
