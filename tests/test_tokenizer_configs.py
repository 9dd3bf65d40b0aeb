"""Tokenizer configs: presets at any patch size, and configs saved under the codebook size's earlier names."""

from __future__ import annotations

import json

import pytest

from modeling_beitv2 import DVAEConfig, VQKDConfig


def test_vqkd_preset_takes_the_encoders_patch_size():
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=56, patch_size=14)
    encoder, decoder = config.encoder_config, config.decoder_config
    assert (encoder.image_size, encoder.patch_size, encoder.hidden_size) == (56, 14, 192)
    assert (decoder.image_size, decoder.patch_size, decoder.num_hidden_layers) == (4, 1, 1)  # the 4x4 grid of codes
    assert VQKDConfig.from_preset("base-decoder3").encoder_config.patch_size == 16  # the paper's default
    with pytest.raises(ValueError, match="image_size 50 is not a multiple of patch_size 14"):
        VQKDConfig.from_preset("tiny-decoder1", image_size=50, patch_size=14)


@pytest.mark.parametrize(
    ("config", "earlier_name"),
    [(VQKDConfig(codebook_size=64, kmeans_init=False), "num_codes"), (DVAEConfig(codebook_size=64), "vocab_size")],
    ids=["vqkd", "dvae"],
)
def test_a_config_saved_with_the_earlier_codebook_name_still_loads(tmp_path, config, earlier_name):
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved[earlier_name] = saved.pop("codebook_size")  # what the previous version wrote
    (tmp_path / "config.json").write_text(json.dumps(saved))

    with pytest.warns(FutureWarning, match=f"`{earlier_name}` is renamed `codebook_size`"):
        loaded = type(config).from_pretrained(tmp_path)
    assert loaded.codebook_size == 64
    assert earlier_name not in loaded.to_dict()  # saved again under the one name
