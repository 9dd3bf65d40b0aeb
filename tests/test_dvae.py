from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from modeling_beitv2 import DVAEConfig, DVAEModel

TINY = dict(codebook_size=64, hidden_size=16, num_blocks_per_group=1, decoder_init_channels=8, image_size=32)


@pytest.fixture
def model() -> DVAEModel:
    torch.manual_seed(0)
    return DVAEModel(DVAEConfig(**TINY)).eval()


def test_default_config_is_the_released_dalle_dvae():
    config = DVAEConfig()
    assert (config.codebook_size, config.hidden_size, config.num_blocks_per_group, config.image_size) == (
        8192,
        256,
        2,
        112,
    )
    assert config.patch_grid == (14, 14)
    with torch.device("meta"):
        model = DVAEModel(config)
    # The published DALL-E encoder has 53.8 M parameters (the decoder 43.8 M).
    assert round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 1) == 53.8
    assert round(sum(p.numel() for p in model.decoder.parameters()) / 1e6, 1) == 43.8


def test_module_names_follow_dall_e(model):
    names = set(model.state_dict())
    for name in (
        "encoder.blocks.input.weight",
        "encoder.blocks.group_1.block_1.res_path.conv_1.weight",
        "encoder.blocks.group_2.block_1.id_path.weight",
        "encoder.blocks.output.conv.bias",
        "decoder.blocks.input.weight",
        "decoder.blocks.group_4.block_1.res_path.conv_4.weight",
        "decoder.blocks.output.conv.weight",
    ):
        assert name in names, name
    # DALL-E's kernel sizes: encoder res path 3,3,3,1 and decoder 1,3,3,3.
    encoder_block = model.encoder.blocks.group_1.block_1.res_path
    decoder_block = model.decoder.blocks.group_1.block_1.res_path
    assert [encoder_block[i].kernel_size[0] for i in (1, 3, 5, 7)] == [3, 3, 3, 1]
    assert [decoder_block[i].kernel_size[0] for i in (1, 3, 5, 7)] == [1, 3, 3, 3]
    # DALL-E's init: std 1 / sqrt(fan_in), zero bias.
    weight = model.encoder.blocks.output.conv.weight
    assert abs(weight.std().item() * (8 * 16) ** 0.5 - 1) < 0.1
    assert torch.all(model.encoder.blocks.output.conv.bias == 0)


def test_tokenize_and_decode(model):
    pixels = torch.rand(2, 3, 32, 32)
    mapped = model.map_pixels(pixels)
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    torch.testing.assert_close(model.unmap_pixels(mapped), pixels)
    output = model(pixels)
    assert output.logits.shape == (2, 64, 4, 4)
    # The model takes plain [0, 1] pixels and applies DALL-E's map_pixels itself.
    torch.testing.assert_close(output.logits, model.encoder(mapped)[0], rtol=0, atol=0)
    indices = model.get_codebook_indices(pixels)
    assert indices.shape == (2, 16) and indices.dtype == torch.int64
    torch.testing.assert_close(indices, output.logits.argmax(1).flatten(1))
    torch.testing.assert_close(indices, output.codebook_indices)
    reconstruction = model.decode(indices)
    assert reconstruction.shape == (2, 3, 32, 32)
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    with pytest.raises(ValueError, match="square grid"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model.encode(torch.rand(2, 1, 32, 32))


def test_config_validation_and_roundtrip(model, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        DVAEConfig(image_size=100)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_dvae.py").exists()
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, DVAEModel)
    pixels = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(pixels).logits, model(pixels).logits)


def test_shared_tokenizer_interface(model):
    assert model.codebook_size == 64 and model.image_size == 32 and model.patch_grid == (4, 4)
    assert model.get_codebook_indices(torch.rand(1, 3, 32, 32)).shape == (1, model.patch_grid[0] * model.patch_grid[1])


def test_non_finite_pixels_raise_instead_of_giving_code_0(model):
    pixels = torch.rand(2, 3, 32, 32)
    pixels[1, 0, 5, 5] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        model.get_codebook_indices(pixels)
    pixels[1, 0, 5, 5] = float("inf")
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        model.get_codebook_indices(pixels)


def test_an_empty_batch_tokenizes_and_decodes_to_an_empty_batch(model):
    assert model.get_codebook_indices(torch.rand(0, 3, 32, 32)).shape == (0, 16)
    decoded = model.decode(torch.zeros(0, 16, dtype=torch.long))
    assert decoded.shape == (0, 3, 32, 32) and decoded.dtype == torch.float32


def test_hidden_states_and_tuple_outputs(model):
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixels, output_hidden_states=True)
        as_tuple = model(pixels, output_hidden_states=True, return_dict=False)
    assert output.hidden_states[-1].shape == (2, 8 * model.config.hidden_size, 4, 4)
    # the logits are the output convolution (after a ReLU) of the last group's feature map
    block = model.encoder.blocks.output
    torch.testing.assert_close(block(output.hidden_states[-1]), output.logits, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], output.logits, rtol=0, atol=0)
    assert len(as_tuple) == 4 and model(pixels).hidden_states is None
