from __future__ import annotations

import json

import pytest
import torch
from conftest import run_without_package
from transformers import AutoConfig, AutoModel

from modeling_beitv2 import VQKDConfig, VQKDModel, VQKDOutput
from modeling_beitv2 import quantizer as quantizer_module
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

TINY_VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def tiny_config(**overrides) -> VQKDConfig:
    kwargs = dict(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **TINY_VIT),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **TINY_VIT),
        codebook_size=64,
        code_dim=8,
        teacher_dim=16,
        kmeans_init=False,
    )
    return VQKDConfig(**{**kwargs, **overrides})


@pytest.fixture
def model() -> VQKDModel:
    torch.manual_seed(0)
    return VQKDModel(tiny_config())


def test_presets_match_the_paper():
    config = VQKDConfig.from_preset("base-decoder3")
    encoder, decoder = config.encoder_config, config.decoder_config
    assert (encoder.hidden_size, encoder.num_hidden_layers, encoder.patch_size, encoder.layer_norm_eps) == (
        768,
        12,
        16,
        1e-6,
    )
    assert encoder.use_absolute_position_embeddings and encoder.layer_scale_init_value == 0
    assert not encoder.use_relative_position_bias and not encoder.use_mean_pooling
    assert (decoder.num_hidden_layers, decoder.patch_size, decoder.image_size, decoder.num_channels) == (3, 1, 14, 32)
    assert (config.codebook_size, config.code_dim, config.decay, config.teacher_dim, config.kmeans_init) == (
        8192,
        32,
        0.99,
        512,
        True,
    )
    assert VQKDConfig.from_preset("base-decoder1").decoder_config.num_hidden_layers == 1
    assert VQKDConfig.from_preset("tiny-decoder1").encoder_config.hidden_size == 192
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        VQKDConfig.from_preset("huge")


def test_config_rejects_mismatched_decoder():
    with pytest.raises(ValueError, match=r"num_channels \(32\) must equal code_dim \(8\)"):
        tiny_config(decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=32, **TINY_VIT))
    with pytest.raises(ValueError, match="patch grid"):
        tiny_config(decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=7, code_dim=8, **TINY_VIT))


def test_partial_dict_sub_configs_get_the_tokenizer_defaults(tmp_path):
    # BeitConfig's own defaults (no position embeddings, no final LayerNorm, layer scale 0.1, eps 1e-12) would
    # silently build another model than the reference tokenizer.
    vit = dict(TINY_VIT, num_hidden_layers=2)
    partial = VQKDConfig(
        encoder_config=dict(vit, image_size=32, patch_size=8),
        decoder_config=dict(TINY_VIT, num_hidden_layers=1),
        code_dim=8,
    )
    helpers = VQKDConfig(
        encoder_config=vqkd_encoder_config(image_size=32, patch_size=8, **vit),
        decoder_config=vqkd_decoder_config(num_layers=1, grid_size=4, code_dim=8, **TINY_VIT),
        code_dim=8,
    )
    assert partial.to_dict() == helpers.to_dict()
    for sub_config in (partial.encoder_config, partial.decoder_config):
        assert sub_config.use_absolute_position_embeddings and not sub_config.use_mean_pooling
        assert sub_config.layer_norm_eps == 1e-6 and sub_config.layer_scale_init_value == 0.0
    decoder = partial.decoder_config
    assert (decoder.num_hidden_layers, decoder.patch_size, decoder.image_size, decoder.num_channels) == (1, 1, 4, 8)
    model = VQKDModel(partial)
    assert isinstance(model.encoder.layernorm, torch.nn.LayerNorm) and model.encoder.layernorm.eps == 1e-6
    assert model.encoder.embeddings.position_embeddings is not None
    assert not isinstance(model.encoder.layers[0].lambda_1, torch.nn.Parameter)  # no layer scale

    # an explicit value still wins, and the saved config.json lists every key, so reloading keeps all of them
    custom = VQKDConfig(encoder_config=dict(vit, image_size=32, patch_size=8, layer_norm_eps=1e-5), code_dim=8)
    assert custom.encoder_config.layer_norm_eps == 1e-5
    partial.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.encoder_config.to_dict() == partial.encoder_config.to_dict()
    assert reloaded.decoder_config.to_dict() == partial.decoder_config.to_dict()


def test_reference_init():
    # timm's trunc_normal_(std=0.02) with its absolute +-2 cut-off: a plain normal of std 0.02 in practice
    torch.manual_seed(0)
    width = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2}
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config(image_size=32, num_hidden_layers=3, **width),
        decoder_config=vqkd_decoder_config(grid_size=2, num_layers=1, **width),
        codebook_size=64,
        kmeans_init=False,
    )
    model = VQKDModel(config)
    layers = model.encoder.layers
    for index, layer in enumerate(layers):
        for weight in (layer.attention.o_proj.weight, layer.mlp.fc2.weight):
            assert weight.std().item() == pytest.approx(0.02 / (2 * (index + 1)) ** 0.5, rel=0.05)
    assert layers[0].attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.encode_task_layer[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.encoder.embeddings.position_embeddings.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(layers[0].attention.q_proj.bias == 0)
    assert torch.allclose(model.quantizer.codebook.norm(dim=-1), torch.ones(64))


def test_half_precision_tokenizer_keeps_the_code_path_in_fp32(model, tmp_path):
    pixels = torch.rand(2, 3, 32, 32)
    expected = model.eval().get_codebook_indices(pixels)
    model.save_pretrained(tmp_path)
    loaded = VQKDModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert (
        loaded.encode_task_layer[0].weight.dtype == torch.float32 and loaded.quantizer.codebook.dtype == torch.float32
    )
    assert loaded.get_codebook_indices(pixels.bfloat16()).shape == expected.shape
    # fp32 pixels follow the encoder's dtype instead of failing in its bf16 patch projection
    assert torch.equal(loaded.get_codebook_indices(pixels), loaded.get_codebook_indices(pixels.bfloat16()))
    cast = VQKDModel.from_pretrained(tmp_path).to(torch.bfloat16)  # everything bf16, codebook included
    assert cast.get_codebook_indices(pixels.bfloat16()).dtype == torch.int64
    assert torch.isfinite(cast.train()(pixels.bfloat16(), teacher_features=torch.randn(2, 16, 16)).loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codes_under_autocast_agree_with_fp32_and_only_the_code_path_runs_in_fp32(model, monkeypatch, dtype):
    model.eval()
    pixels = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = model.get_codebook_indices(pixels)

    seen = {}
    lookup = quantizer_module.nearest_code_indices

    def recording_lookup(vectors, codebook, *args, **kwargs):
        seen["lookup"] = (vectors.dtype, codebook.dtype, torch.is_autocast_enabled("cpu"))
        return lookup(vectors, codebook, *args, **kwargs)

    monkeypatch.setattr(quantizer_module, "nearest_code_indices", recording_lookup)
    attention = model.encoder.layers[0].attention
    attention.q_proj.register_forward_hook(lambda module, args, output: seen.update(query=output.dtype))
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(mask=kwargs.get("attention_mask")), with_kwargs=True
    )
    model.encode_task_layer.register_forward_hook(
        lambda module, args, output: seen.update(task_layer=(args[0].dtype, output.dtype))
    )
    with torch.autocast("cpu", dtype=dtype):
        codes = model.get_codebook_indices(pixels)
    # The encoder runs in half precision with no attention mask, so SDPA may pick the flash kernel on a GPU;
    # the task layer and the nearest-code search run in fp32 with autocast off.
    assert seen["query"] == dtype and seen["mask"] is None
    assert seen["task_layer"] == (torch.float32, torch.float32)
    assert seen["lookup"] == (torch.float32, torch.float32, False)
    agreement = (codes == reference).float().mean().item()
    print(f"{dtype} autocast codes equal to fp32 ones on {agreement:.1%} of {codes.numel()} patches")
    assert agreement >= 0.8


def test_tokenizer_compiles(model):
    model.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model.get_codebook_indices, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.get_codebook_indices(pixels)
        assert torch.equal(compiled(pixels), expected)


def test_forward_losses_and_shapes(model):
    pixels = torch.rand(2, 3, 32, 32)
    teacher = torch.randn(2, 16, 16)
    output = model(pixels, teacher_features=teacher)
    assert isinstance(output, VQKDOutput)
    assert output.codebook_indices.shape == (2, 16) and output.codebook_indices.dtype == torch.int64
    assert output.reconstruction.shape == (2, 16, 16)
    cosine = torch.nn.functional.cosine_similarity(output.reconstruction, teacher, dim=-1)
    torch.testing.assert_close(output.reconstruction_loss, (1 - cosine).mean())
    torch.testing.assert_close(output.loss, output.reconstruction_loss + output.quantization_loss)
    assert 0 < output.codebook_usage <= 1 and 1 <= output.perplexity <= 32
    output.loss.backward()
    assert model.encoder.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.encode_task_layer[0].weight.grad.abs().sum() > 0
    assert model(pixels).loss is None
    with pytest.raises(ValueError, match="teacher_dim=16"):
        model(pixels, teacher_features=torch.randn(2, 16, 12))


def test_training_updates_codebook_but_tokenization_does_not(model):
    pixels = torch.rand(2, 3, 32, 32)
    snapshot = {name: buffer.clone() for name, buffer in model.named_buffers() if name.startswith("quantizer")}
    for mode in (True, False):
        indices = model.train(mode).get_codebook_indices(pixels)
        assert indices.shape == (2, 16)
        for name, buffer in model.named_buffers():
            if name in snapshot:
                assert torch.equal(buffer, snapshot[name]), name
    model.train()(pixels)
    assert not torch.equal(model.quantizer.codebook, snapshot["quantizer.codebook"])
    model.eval()
    torch.testing.assert_close(model.get_codebook_indices(pixels), model.encode(pixels).indices)


def test_decode_from_indices_equals_decode_from_quantized(model):
    model.eval()
    encoded = model.encode(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(model.decode(indices=encoded.indices), model.decode(quantized=encoded.quantized))
    with pytest.raises(ValueError, match="exactly one"):
        model.decode()
    with pytest.raises(ValueError, match="Expected 16 codes"):
        model.decode(indices=torch.zeros(1, 9, dtype=torch.long))


def test_save_load_roundtrip_and_auto_classes(model, tmp_path):
    model.train()(torch.rand(2, 3, 32, 32))  # move the codebook away from its init
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "beitv2_vqkd"
    assert saved["auto_map"]["AutoModel"] == "modeling_vqkd.VQKDModel"
    for module in ("configuration_vqkd.py", "modeling_vqkd.py", "quantizer.py", "initialization.py"):
        assert (tmp_path / module).exists(), module
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VQKDConfig)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, VQKDModel)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


@pytest.mark.slow
def test_custom_code_reload_in_fresh_process(model, tmp_path):
    model.eval()
    pixels = torch.rand(2, 3, 32, 32)
    expected = model.get_codebook_indices(pixels)
    model.save_pretrained(tmp_path / "vqkd")
    torch.save(pixels, tmp_path / "pixels.pt")
    result = run_without_package(
        """
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("vqkd", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print(model.get_codebook_indices(torch.load("pixels.pt")).tolist())
        """,
        cwd=tmp_path,
    )
    assert result.stdout.strip().splitlines()[-1] == str(expected.tolist())


def test_takes_plain_pixels_and_maps_them_itself(model):
    # The reference's `pre_process`: [0, 1] -> [-1, 1] inside the tokenizer, before the encoder.
    model.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    by_hand = model.encode_task_layer(model.encoder.patch_features(pixels * 2 - 1))
    torch.testing.assert_close(model.encode(pixels).indices, model.quantizer.lookup(by_hand), rtol=0, atol=0)
    assert torch.equal(model.get_codebook_indices(pixels), model.quantizer.lookup(by_hand))


def test_shared_tokenizer_interface(model):
    assert model.codebook_size == model.config.codebook_size
    assert model.image_size == 32 and model.patch_grid == (4, 4)
    assert model.eval().get_codebook_indices(torch.rand(1, 3, 32, 32)).shape == (1, 16)


def test_non_finite_pixels_raise_instead_of_giving_code_0(model):
    pixels = torch.rand(2, 3, 32, 32)
    pixels[0, 2, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        model.eval().get_codebook_indices(pixels)


def test_an_empty_batch_decodes_to_an_empty_batch(model):
    decoded = model.eval().decode(torch.zeros(0, 16, dtype=torch.long))
    assert decoded.shape == (0, 16, model.config.teacher_dim)


def test_forward_returns_the_encoders_hidden_states_and_attentions(model):
    model = VQKDModel._from_config(model.config, attn_implementation="eager").eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixels)
        output = model(pixels, output_hidden_states=True, output_attentions=True)
        encoder = model.encoder((pixels * 2 - 1), output_hidden_states=True, output_attentions=True)
        as_tuple = model(pixels, return_dict=False)
    assert plain.hidden_states is None and plain.attentions is None
    num_layers = model.config.encoder_config.num_hidden_layers
    assert len(output.hidden_states) == num_layers + 1 and len(output.attentions) == num_layers
    for actual, expected in zip(output.hidden_states + output.attentions, encoder.hidden_states + encoder.attentions):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(output.codebook_indices, plain.codebook_indices, rtol=0, atol=0)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], plain.quantization_loss, rtol=0, atol=0)
    assert type(model.get_input_embeddings()).__name__ == "BeitPatchEmbeddings"
