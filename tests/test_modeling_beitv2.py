from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import run_without_package
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedImageModeling,
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitModel,
)
from transformers.testing_utils import CaptureLogger

from modeling_beitv2 import (
    BeitV2Config,
    BeitV2ForMaskedImageModeling,
    BeitV2Model,
    convert_mim_to_native_beit,
    convert_to_native_feature_extractor,
    resize_relative_position_bias_table,
)


def make_batch(config: BeitV2Config, batch_size: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator)
    bool_masked_pos = torch.rand(batch_size, config.num_patches, generator=generator) < 0.4
    bool_masked_pos[:, 0] = True  # at least one masked patch per image
    labels = torch.randint(0, config.vocab_size, (batch_size, config.num_patches), generator=generator)
    return pixel_values, bool_masked_pos, labels


def randomize_all_parameters(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised tables and unit LayerNorms would hide wiring bugs: give every weight a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (1.0 if param.ndim == 1 else 0.0))


# ----------------------------------------------------------------------------------------------- configuration


def test_config_defaults_are_beitv2_base():
    config = BeitV2Config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 8192)
    assert config.use_mask_token and config.use_shared_relative_position_bias
    assert not config.use_absolute_position_embeddings and not config.use_relative_position_bias
    assert config.layer_scale_init_value == 0.1 and config.layer_norm_eps == 1e-6
    assert (config.use_patch_aggregation, config.early_layers, config.head_layers, config.shared_lm_head) == (
        True,
        9,
        2,
        True,
    )


@pytest.mark.parametrize(
    ("preset", "width", "depth", "early", "layer_scale"),
    [("tiny", 192, 12, 9, 0.1), ("small", 384, 12, 9, 0.1), ("base", 768, 12, 9, 0.1), ("large", 1024, 24, 21, 1e-5)],
)
def test_presets(preset, width, depth, early, layer_scale):
    config = BeitV2Config.from_preset(preset)
    assert (config.hidden_size, config.num_hidden_layers, config.early_layers) == (width, depth, early)
    assert config.layer_scale_init_value == layer_scale
    assert BeitV2Config.from_preset(preset, hidden_size=48, num_attention_heads=3).hidden_size == 48


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 30}, "not divisible by patch_size"),
        ({"early_layers": 4}, r"early_layers must lie in \[1, num_hidden_layers - 1\] = \[1, 3\], got 4"),
        ({"early_layers": 0}, "got 0"),
        ({"head_layers": 0}, "head_layers"),
        ({"image_size": [32, 48]}, "must be square"),
    ],
)
def test_config_errors(tiny_beitv2_kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        BeitV2Config(**{**tiny_beitv2_kwargs, **overrides})
    with pytest.raises(ValueError, match="Unknown preset"):
        BeitV2Config.from_preset("huge")


def test_config_round_trip(tmp_path, tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs, shared_lm_head=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "beitv2" and saved["early_layers"] == 2 and saved["shared_lm_head"] is False
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    reloaded.pop("_name_or_path")
    assert reloaded == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_config_rejects_use_mean_pooling_false(tiny_beitv2_kwargs):
    # BeitModel would add its own final LayerNorm on top of the MIM model's: tokens normalised twice.
    assert BeitV2Config(**tiny_beitv2_kwargs).use_mean_pooling
    assert all(BeitV2Config.from_preset(name).use_mean_pooling for name in ("tiny", "base", "large"))
    with pytest.raises(ValueError, match="use_mean_pooling=False .*applies the final LayerNorm itself"):
        BeitV2Config(**tiny_beitv2_kwargs, use_mean_pooling=False)


# ---------------------------------------------------------------------------------------------- initialisation


def test_reference_initialisation(tiny_beitv2_kwargs):
    torch.manual_seed(0)
    config = BeitV2Config(**{**tiny_beitv2_kwargs, "hidden_size": 64, "intermediate_size": 256})
    model = BeitV2ForMaskedImageModeling(config)
    std = config.initializer_range
    trunc_std = std * 0.5379  # std of a normal truncated at +-1 sigma
    for index, layer in enumerate(model.beit.layers):
        # Truncated at +-1 std, not +-2.
        assert layer.attention.q_proj.weight.abs().max() <= std + 1e-7
        assert layer.attention.q_proj.weight.std().item() == pytest.approx(trunc_std, rel=0.1)
        expected = trunc_std / math.sqrt(2 * (index + 1))
        assert layer.attention.o_proj.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert layer.mlp.fc2.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert torch.all(layer.lambda_1 == 0.1) and torch.all(layer.attention.q_proj.bias == 0)
    assert model.beit.embeddings.mask_token.abs().max() <= std and model.beit.embeddings.mask_token.std() > 0
    assert model.beit.embeddings.cls_token.abs().max() <= std and model.beit.embeddings.cls_token.std() > 0
    assert model.lm_head.weight.abs().max() <= std
    assert torch.all(model.beit.shared_position_bias.relative_position_bias_table == 0)
    # Aggregation head: PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), rescaled for layers 3 and 4.
    for offset, layer in enumerate(model.aggregation_head.layers):
        bound = 1 / math.sqrt(64) / math.sqrt(2 * (config.early_layers + offset + 1))
        weight = layer.mlp.fc2.weight
        assert weight.abs().max() <= 1 / math.sqrt(256) / math.sqrt(2 * (config.early_layers + offset + 1)) + 1e-7
        assert layer.attention.o_proj.weight.abs().max() <= bound + 1e-7
        assert layer.attention.o_proj.weight.abs().max() > 0.8 * bound  # uniform, not a truncated normal
        assert layer.mlp.fc1.bias.abs().max() > 0  # PyTorch's default bias init is not zero, but the
        # reference's q/v biases are separate parameters created as zeros
        assert torch.all(layer.attention.q_proj.bias == 0) and torch.all(layer.attention.v_proj.bias == 0)


def test_from_pretrained_keeps_loaded_weights(tmp_path, tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    randomize_all_parameters(model)
    model.save_pretrained(tmp_path)
    reloaded, info = BeitV2ForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, expected), actual in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------ forward pass


def test_beit_v1_mode_matches_transformers_beit_for_masked_image_modeling(tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs, use_patch_aggregation=False)
    ours = BeitV2ForMaskedImageModeling(config).eval()
    randomize_all_parameters(ours)
    stock_fields = set(BeitConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
    stock_config = BeitConfig(**{k: v for k, v in config.to_dict().items() if k in stock_fields})
    reference = BeitForMaskedImageModeling(stock_config).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    pixel_values, bool_masked_pos, labels = make_batch(config)
    masked_labels = labels[bool_masked_pos]
    with torch.no_grad():
        ours_out = ours(pixel_values, bool_masked_pos, labels=labels)
        ref_out = reference(pixel_values, bool_masked_pos=bool_masked_pos, labels=masked_labels)
    torch.testing.assert_close(ours_out.logits, ref_out.logits[bool_masked_pos], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert ours_out.loss_aggregation is None and ours_out.aggregation_logits is None


def _aggregation_by_hand(model: BeitV2ForMaskedImageModeling, pixel_values, bool_masked_pos):
    """Patch aggregation written out from the paper/reference description, block by block."""
    config = model.config
    beit = model.beit
    embeddings = beit.embeddings.patch_embeddings(pixel_values)
    mask = bool_masked_pos.unsqueeze(-1).to(embeddings.dtype)
    embeddings = embeddings * (1 - mask) + beit.embeddings.mask_token * mask
    hidden = torch.cat([beit.embeddings.cls_token.expand(len(pixel_values), -1, -1), embeddings], dim=1)
    grid = config.image_size // config.patch_size
    bias = beit.shared_position_bias((grid, grid), dim_size=hidden.shape[1])
    resolution = pixel_values.shape[2:]
    for index, layer in enumerate(beit.layers):
        hidden = layer(hidden, attention_mask=bias, resolution=resolution)
        if index + 1 == config.early_layers:
            early_patches = hidden[:, 1:]
    head = torch.cat([hidden[:, :1], early_patches], dim=1)
    for layer in model.aggregation_head.layers:
        head = layer(head, attention_mask=bias, resolution=resolution)
    main_logits = model.lm_head(model.layernorm(hidden))[:, 1:][bool_masked_pos]
    head_logits = model.lm_head(model.layernorm(head))[:, 1:][bool_masked_pos]
    return main_logits, head_logits


def test_patch_aggregation_matches_hand_written_computation(tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs)
    model = BeitV2ForMaskedImageModeling(config).eval()
    randomize_all_parameters(model)
    pixel_values, bool_masked_pos, labels = make_batch(config)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos, labels=labels)
        main_logits, head_logits = _aggregation_by_hand(model, pixel_values, bool_masked_pos)
    torch.testing.assert_close(out.logits, main_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aggregation_logits, head_logits, rtol=1e-5, atol=1e-5)
    targets = labels[bool_masked_pos]
    expected_mim = torch.nn.functional.cross_entropy(main_logits, targets)
    expected_agg = torch.nn.functional.cross_entropy(head_logits, targets)
    torch.testing.assert_close(out.loss_mim, expected_mim)
    torch.testing.assert_close(out.loss_aggregation, expected_agg)
    torch.testing.assert_close(out.loss, expected_mim + expected_agg)
    assert out.mim_accuracy == (main_logits.argmax(-1) == targets).float().mean()
    assert out.aggregation_accuracy == (head_logits.argmax(-1) == targets).float().mean()
    assert out.logits.shape == (int(bool_masked_pos.sum()), config.vocab_size)


def test_separate_aggregation_lm_head(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs, shared_lm_head=False))
    pixel_values, bool_masked_pos, labels = make_batch(model.config)
    out = model(pixel_values, bool_masked_pos, labels=labels)
    out.loss.backward()
    assert model.aggregation_head.lm_head.weight.grad.abs().sum() > 0
    assert model.aggregation_head.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_labels_as_full_grid_or_masked_codes_agree(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).eval()
    pixel_values, bool_masked_pos, labels = make_batch(model.config)
    with torch.no_grad():
        full = model(pixel_values, bool_masked_pos, labels=labels)
        masked = model(pixel_values, bool_masked_pos, labels=labels[bool_masked_pos])
        grid = model(pixel_values, bool_masked_pos.view(3, 4, 4), labels=labels)
    assert full.loss == masked.loss == grid.loss


def test_lm_head_only_sees_masked_positions(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs, use_patch_aggregation=False))
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    pixel_values, bool_masked_pos, _ = make_batch(model.config)
    model(pixel_values, bool_masked_pos)
    assert seen == [int(bool_masked_pos.sum())]


def test_batch_without_masked_patches_gives_zero_loss_not_nan(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    pixel_values, _, labels = make_batch(model.config)
    no_mask = torch.zeros(3, model.config.num_patches, dtype=torch.bool)
    out = model(pixel_values, no_mask, labels=labels)
    assert out.loss.item() == 0.0 and out.mim_accuracy.item() == 0.0
    assert out.logits.shape == (0, model.config.vocab_size)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        (
            "bool_masked_pos",
            torch.zeros(3, 15, dtype=torch.bool),
            r"bool_masked_pos has shape \(3, 15\); expected \(3, 16\)",
        ),
        ("labels", torch.zeros(3, 15, dtype=torch.long), r"labels has shape \(3, 15\)"),
        ("labels", torch.zeros(2, dtype=torch.long), "codes of the"),
        ("pixel_values", torch.zeros(3, 3, 30, 32), "not divisible by patch size"),
    ],
)
def test_bad_inputs_raise_value_error(tiny_beitv2_kwargs, field, bad, message):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    pixel_values, bool_masked_pos, labels = make_batch(model.config)
    inputs = {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos, "labels": labels, field: bad}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def make_exact_count_batch(config: BeitV2Config, num_masked: int, batch_size: int = 3, seed: int = 0):
    """A batch whose masks hide exactly `num_masked` patches per image, as BEiT's mask generators do."""
    pixel_values, _, labels = make_batch(config, batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    bool_masked_pos = torch.zeros(batch_size, config.num_patches, dtype=torch.bool)
    for row in bool_masked_pos:
        row[torch.randperm(config.num_patches, generator=generator)[:num_masked]] = True
    return pixel_values, bool_masked_pos, labels


@pytest.mark.parametrize("num_masked", [5, 0])
@pytest.mark.parametrize("labels_form", ["grid", "masked_codes"])
def test_static_masked_count_path_is_identical_to_boolean_indexing(tiny_beitv2_kwargs, num_masked, labels_form):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs, shared_lm_head=False))
    randomize_all_parameters(model)
    pixel_values, bool_masked_pos, labels = make_exact_count_batch(model.config, num_masked)
    if labels_form == "masked_codes":
        labels = labels[bool_masked_pos]
    outputs, grads = [], []
    for count in (None, num_masked):
        model.zero_grad()
        out = model(pixel_values, bool_masked_pos, labels, num_masked_patches=count)
        out.loss.backward()
        outputs.append(out)
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()})
    dynamic, static = outputs
    assert static.logits.shape == (3 * num_masked, model.config.vocab_size)
    for field in dynamic:
        assert torch.equal(static[field], dynamic[field]), field
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


def test_static_masked_count_path_checks_without_synchronising(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    pixel_values, bool_masked_pos, labels = make_exact_count_batch(model.config, 5)
    for bad in (True, 5.0, torch.tensor(5)):
        with pytest.raises(ValueError, match="num_masked_patches must be an int or None"):
            model(pixel_values, bool_masked_pos, num_masked_patches=bad)
    for bad in (-1, 17):
        with pytest.raises(ValueError, match=rf"num_masked_patches must lie in \[0, 16\], got {bad}"):
            model(pixel_values, bool_masked_pos, num_masked_patches=bad)
    with pytest.raises(ValueError, match=r"labels has shape \(14,\); .*codes of the 15 masked patches \(15,\)"):
        model(pixel_values, bool_masked_pos, labels[bool_masked_pos][:-1], num_masked_patches=5)
    # The count itself is checked on the device: on CPU the assertion fires at once.
    bool_masked_pos[1, ~bool_masked_pos[1]] = torch.tensor([True] + [False] * 10)
    with pytest.raises(RuntimeError, match="must mask exactly num_masked_patches=5 patches in every image"):
        model(pixel_values, bool_masked_pos, labels, num_masked_patches=5)


def test_static_path_compiles_to_one_graph_and_matches_eager(tiny_beitv2_kwargs):
    # `fullgraph=True` fails on any graph break: a host-device synchronisation (`int(tensor)`, boolean indexing)
    # would be one. The Inductor backend adds minutes of C++ compilation on CPU and nothing to the graph capture.
    torch._dynamo.reset()
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    randomize_all_parameters(model)
    pixel_values, bool_masked_pos, labels = make_exact_count_batch(model.config, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    actual = compiled(pixel_values, bool_masked_pos, labels, num_masked_patches=5)
    actual.loss.backward()
    actual_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    expected = model(pixel_values, bool_masked_pos, labels, num_masked_patches=5)
    expected.loss.backward()
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.aggregation_logits, expected.aggregation_logits, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(actual_grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_static_path_never_synchronises_on_gpu(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).cuda()
    batch = [tensor.cuda() for tensor in make_exact_count_batch(model.config, 5)]
    model(*batch, num_masked_patches=5).loss.backward()  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(*batch, num_masked_patches=5).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sdpa_and_eager_attention_agree(tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs)
    eager = BeitV2ForMaskedImageModeling._from_config(config, attn_implementation="eager").eval()
    randomize_all_parameters(eager)
    sdpa = BeitV2ForMaskedImageModeling._from_config(BeitV2Config(**tiny_beitv2_kwargs), attn_implementation="sdpa")
    sdpa.eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    pixel_values, bool_masked_pos, labels = make_batch(config)
    with torch.no_grad():
        a, b = eager(pixel_values, bool_masked_pos, labels), sdpa(pixel_values, bool_masked_pos, labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.aggregation_logits, b.aggregation_logits, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs)
    model = BeitV2ForMaskedImageModeling(config).train()
    pixel_values, bool_masked_pos, labels = make_batch(config)
    model(pixel_values, bool_masked_pos, labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.beit.layers[0].gradient_checkpointing and model.aggregation_head.layers[0].gradient_checkpointing
    model(pixel_values, bool_masked_pos, labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_training_step(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    pixel_values, bool_masked_pos, labels = make_batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, bool_masked_pos, labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_drop_path_rates_follow_the_reference_ramp(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs, drop_path_rate=0.3))
    trunk = [layer.drop_path.drop_prob for layer in model.beit.layers[1:]]
    head = [layer.drop_path.drop_prob for layer in model.aggregation_head.layers]
    assert trunk == pytest.approx([0.1, 0.2, 0.3])
    assert head == pytest.approx([0.2, 0.3])  # linspace(0, 0.3, 4)[2:4]


# ------------------------------------------------------------------------------------------ export to native


def _reference_offset_positions(grid_size: int, target_grid_size: int) -> torch.Tensor:
    """The official loaders' source offset positions, written out independently: q bisected on [1.01, 1.5]."""
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if sum(q**power for power in range(grid_size // 2)) > target_grid_size // 2:
            high = q
        else:
            low = q
    positive = [sum(q**power for power in range(count)) for count in range(1, grid_size // 2 + 1)]
    return torch.tensor([-p for p in reversed(positive)] + [0.0] + positive, dtype=torch.float64)


def _axis_positions(grid_size: int, target_grid_size: int) -> torch.Tensor:
    if grid_size == target_grid_size:  # an axis that keeps its size is not resampled
        return torch.arange(grid_size, dtype=torch.float64) - grid_size // 2
    return _reference_offset_positions(grid_size, target_grid_size)


def _table_from_grid(grid: torch.Tensor, cls_rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([grid.reshape(-1, grid.shape[-1]), cls_rows]).float()


def test_resize_relative_position_bias_table_shapes_identity_and_errors():
    heads = 2
    table = torch.randn(7 * 7 + 3, heads)
    same = resize_relative_position_bias_table(table, (4, 4), (4, 4))
    torch.testing.assert_close(same, table)
    assert same.data_ptr() != table.data_ptr()
    resized = resize_relative_position_bias_table(table, (4, 4), (6, 6))
    assert resized.shape == (11 * 11 + 3, heads) and resized.dtype == table.dtype
    torch.testing.assert_close(resized[-3:], table[-3:], rtol=0, atol=0)
    # Offset (0, 0) is a source sample position and an integer target: its bias is kept.
    torch.testing.assert_close(resized[:-3].view(11, 11, heads)[5, 5], table[:-3].view(7, 7, heads)[3, 3])
    non_square = resize_relative_position_bias_table(torch.randn(9 * 13 + 3, 4), (5, 7), (8, 7))
    assert non_square.shape == (15 * 13 + 3, 4)
    with pytest.raises(ValueError, match="needs 52"):
        resize_relative_position_bias_table(torch.zeros(50, 2), (4, 4), (6, 6))


@pytest.mark.parametrize(
    ("source_window", "target_window"), [((4, 4), (6, 6)), ((14, 14), (32, 32)), ((5, 8), (9, 12)), ((6, 5), (4, 5))]
)
def test_resize_relative_position_bias_table_reproduces_cubics_at_the_geometric_positions(
    source_window, target_window
):
    # A not-a-knot cubic spline reproduces cubic polynomials, so a table that is a product of cubics of the
    # reference's geometric source positions must come out as the same cubics of the integer target offsets
    # (targets past the last source position take the border value, like scipy's interp2d).
    (src_h, src_w), (dst_h, dst_w) = ((2 * rows - 1, 2 * cols - 1) for rows, cols in (source_window, target_window))
    y_positions, x_positions = _axis_positions(src_h, dst_h), _axis_positions(src_w, dst_w)

    def along_y(offset):
        return 2.0 + 0.3 * offset - 0.05 * offset**2 + 0.002 * offset**3

    def along_x(offset):
        return 1.0 - 0.1 * offset + 0.01 * offset**2 + 0.001 * offset**3

    heads_scale = torch.tensor([1.0, -0.5], dtype=torch.float64)
    grid = along_y(y_positions)[:, None, None] * along_x(x_positions)[None, :, None] * heads_scale
    resized = resize_relative_position_bias_table(
        _table_from_grid(grid, torch.randn(3, 2)), source_window, target_window
    )

    y_targets = (torch.arange(dst_h, dtype=torch.float64) - dst_h // 2).clamp(y_positions[0], y_positions[-1])
    x_targets = (torch.arange(dst_w, dtype=torch.float64) - dst_w // 2).clamp(x_positions[0], x_positions[-1])
    expected = along_y(y_targets)[:, None, None] * along_x(x_targets)[None, :, None] * heads_scale
    torch.testing.assert_close(resized[:-3].view(dst_h, dst_w, 2).double(), expected, rtol=1e-5, atol=1e-4)


def test_resize_relative_position_bias_table_small_windows_and_separability():
    # A 2x2 window has only 3 offsets per axis, too few for a cubic spline: the quadratic through them is used.
    offsets = torch.arange(3, dtype=torch.float64) - 1
    quadratic = (1.0 + offsets + 0.5 * offsets**2)[:, None, None].expand(3, 3, 1)
    resized = resize_relative_position_bias_table(_table_from_grid(quadratic, torch.zeros(3, 1)), (2, 2), (3, 3))
    positions = _reference_offset_positions(3, 5)
    targets = (torch.arange(5, dtype=torch.float64) - 2).clamp(positions[0], positions[-1])
    expected = (1.0 + targets + 0.5 * targets**2)[:, None].expand(5, 5)
    torch.testing.assert_close(resized[:-3].view(5, 5).double(), expected, rtol=1e-6, atol=1e-6)
    # A table that depends only on dy stays constant along dx (the grid is resized per axis, not as a flat list).
    rows_only = torch.randn(7, 1, 2).expand(7, 7, 2)
    resized_rows = resize_relative_position_bias_table(_table_from_grid(rows_only, torch.zeros(3, 2)), (4, 4), (6, 6))
    resized_rows = resized_rows[:-3].view(11, 11, 2)
    torch.testing.assert_close(resized_rows, resized_rows[:, :1].expand_as(resized_rows))


def test_resize_relative_position_bias_table_keeps_near_offsets_near():
    # The geometric positions keep neighbouring offsets about one patch apart; a uniform stretch of the
    # 27-offset axis onto 63 offsets (the old bicubic resize) gave offset (0, 1) a bias of -0.227 instead of -1.
    offsets = torch.arange(27, dtype=torch.float64) - 13
    manhattan = -(offsets.abs()[:, None] + offsets.abs()[None, :])[:, :, None]
    resized = resize_relative_position_bias_table(_table_from_grid(manhattan, torch.zeros(3, 1)), (14, 14), (32, 32))
    resized = resized[:-3].view(63, 63)
    assert resized[31, 31].item() == pytest.approx(0.0, abs=1e-6)
    assert resized[31, 32].item() == pytest.approx(-1.0, abs=0.05)
    assert resized[32, 31].item() == pytest.approx(-1.0, abs=0.05)
    assert resized[31, 62].item() == pytest.approx(-13.0, abs=0.05)  # the farthest offset keeps the farthest bias


def test_exported_backbone_matches_mim_backbone(tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).eval()
    randomize_all_parameters(model)
    native = convert_mim_to_native_beit(model, BeitModel).eval()
    assert native.config.model_type == "beit" and native.config.use_relative_position_bias
    assert not native.config.use_shared_relative_position_bias and native.embeddings.mask_token is None
    pixel_values, _, _ = make_batch(model.config)
    with torch.no_grad():
        expected = model.beit(pixel_values, output_hidden_states=True).hidden_states
        actual = native(pixel_values, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == model.config.num_hidden_layers + 1
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    shared = model.beit.shared_position_bias.relative_position_bias_table
    for layer in native.layers:
        torch.testing.assert_close(layer.relative_position_bias.relative_position_bias_table, shared)


def test_export_takes_its_labels_from_the_overrides_only(tiny_beitv2_kwargs):
    """The pretraining config's two placeholder labels do not reach the classifier (transformers warned that
    `num_labels` contradicted them)."""
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    with CaptureLogger(transformers.utils.logging.get_logger("transformers")) as captured:
        classifier = convert_mim_to_native_beit(model, BeitForImageClassification, num_labels=5)
    assert "incompatible" not in captured.out
    assert classifier.config.num_labels == len(classifier.config.id2label) == 5
    named = convert_mim_to_native_beit(model, BeitForImageClassification, id2label={0: "cat", 1: "dog", 2: "owl"})
    assert named.config.num_labels == 3 and named.config.id2label == {0: "cat", 1: "dog", 2: "owl"}


def test_export_lives_in_its_own_module_and_is_re_exported():
    import modeling_beitv2.export_native
    import modeling_beitv2.modeling_beitv2

    assert modeling_beitv2.export_native.convert_mim_to_native_beit is convert_mim_to_native_beit
    assert not hasattr(modeling_beitv2.modeling_beitv2, "convert_mim_to_native_beit")


@pytest.mark.parametrize(
    ("model_class", "overrides"),
    [
        (BeitForImageClassification, {"num_labels": 5}),
        (BeitForSemanticSegmentation, {"num_labels": 3, "out_indices": [0, 1, 2, 3], "image_size": 64}),
    ],
)
def test_export_saves_a_native_checkpoint_without_missing_backbone_keys(
    tmp_path, tiny_beitv2_kwargs, model_class, overrides
):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs))
    randomize_all_parameters(model)
    native = convert_mim_to_native_beit(model, model_class, **overrides)
    native.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "beit" and "auto_map" not in config
    assert not list(tmp_path.glob("*.py"))
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in native.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    window = (overrides.get("image_size", 32) // 8,) * 2
    table = reloaded.beit.layers[0].relative_position_bias.relative_position_bias_table
    assert table.shape[0] == (2 * window[0] - 1) * (2 * window[1] - 1) + 3
    pixel_values = torch.randn(2, 3, overrides.get("image_size", 32), overrides.get("image_size", 32))
    assert torch.isfinite(reloaded(pixel_values).logits).all()


# ------------------------------------------------------------------------------------- Auto classes, Hub code


def test_auto_classes(tmp_path, tiny_beitv2_kwargs):
    config = AutoConfig.for_model("beitv2", **tiny_beitv2_kwargs)
    assert isinstance(config, BeitV2Config)
    assert isinstance(AutoModel.from_config(config), BeitV2Model)
    model = AutoModelForMaskedImageModeling.from_config(config)
    assert isinstance(model, BeitV2ForMaskedImageModeling)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForMaskedImageModeling.from_pretrained(tmp_path), BeitV2ForMaskedImageModeling)
    assert isinstance(AutoModel.from_pretrained(tmp_path), BeitV2Model)


def test_custom_code_reloads_in_a_fresh_process_without_the_package(tmp_path, tiny_beitv2_kwargs):
    model = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).eval()
    randomize_all_parameters(model)
    folder = tmp_path / "mim"
    model.save_pretrained(folder)
    saved_code = {p.name for p in folder.glob("*.py")}
    assert {"configuration_beitv2.py", "modeling_beitv2.py", "initialization.py", "attention.py"} <= saved_code
    # The export to native `beit` is a tool for this package's users, not part of the model: it is not shipped.
    assert "export_native.py" not in saved_code
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForMaskedImageModeling"] == "modeling_beitv2.BeitV2ForMaskedImageModeling"
    assert auto_map["AutoModel"] == "modeling_beitv2.BeitV2Model"
    pixel_values, bool_masked_pos, labels = make_batch(model.config)
    torch.save({"inputs": (pixel_values, bool_masked_pos, labels)}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(pixel_values, bool_masked_pos, labels).loss.item()
    result = run_without_package(
        f"""
        import torch
        try:
            import modeling_beitv2
            raise SystemExit("the package should not be importable here")
        except ModuleNotFoundError:
            pass
        from transformers import AutoModelForMaskedImageModeling
        model = AutoModelForMaskedImageModeling.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        pixel_values, bool_masked_pos, labels = torch.load({str(tmp_path / "inputs.pt")!r})["inputs"]
        with torch.no_grad():
            print("LOSS", model(pixel_values, bool_masked_pos, labels).loss.item())
        from transformers import AutoModel
        backbone, info = AutoModel.from_pretrained(
            {str(folder)!r}, trust_remote_code=True, output_loading_info=True
        )
        assert not info["missing_keys"], info["missing_keys"]
        assert type(backbone).__name__ == "BeitV2Model", type(backbone)
        backbone.eval()
        with torch.no_grad():
            output = backbone(pixel_values)
            # the MIM model's final LayerNorm ends the backbone; the probe reads [CLS] (patch aggregation)
            expected = model.layernorm(model.beit(pixel_values).last_hidden_state)
        print("BACKBONE_DIFF", (output.last_hidden_state - expected).abs().max().item())
        print("POOLER_DIFF", (output.pooler_output - expected[:, 0]).abs().max().item())
        """,
        cwd=tmp_path,
    )
    loss = float(result.stdout.split("LOSS")[1].split()[0])
    assert loss == pytest.approx(expected, rel=1e-6)
    assert float(result.stdout.split("BACKBONE_DIFF")[1].split()[0]) == 0.0
    assert float(result.stdout.split("POOLER_DIFF")[1]) == 0.0


# ------------------------------------------------------------------ pooler, native feature extractor, meta init


@pytest.mark.parametrize("use_patch_aggregation", [True, False])
def test_pooler_output_is_the_linear_probe_representation(tiny_beitv2_kwargs, use_patch_aggregation):
    """[CLS] after the final LayerNorm with patch aggregation, else the mean of the normalised patch tokens (the
    protocol of examples/run_linear_probe.py), read from a backbone loaded as `AutoModel` loads it."""
    config = BeitV2Config(**tiny_beitv2_kwargs, use_patch_aggregation=use_patch_aggregation)
    mim = BeitV2ForMaskedImageModeling(config).eval()
    randomize_all_parameters(mim)
    backbone = BeitV2Model(config).eval()
    missing, unexpected = backbone.load_state_dict(
        {**{k.removeprefix("beit."): v for k, v in mim.state_dict().items() if k.startswith("beit.")},
         **{f"layernorm.{k}": v for k, v in mim.layernorm.state_dict().items()}},
        strict=False,
    )  # fmt: skip
    assert not missing and not unexpected
    pixel_values, _, _ = make_batch(config)
    with torch.no_grad():
        output = backbone(pixel_values)
        tokens = mim.layernorm(mim.beit(pixel_values).last_hidden_state)
    torch.testing.assert_close(output.last_hidden_state, tokens, rtol=0, atol=0)
    expected = tokens[:, 0] if use_patch_aggregation else tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(output.pooler_output, expected, rtol=0, atol=0)


def test_backbone_loaded_from_a_mim_checkpoint_has_the_final_layernorm(tmp_path, tiny_beitv2_kwargs):
    mim = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).eval()
    randomize_all_parameters(mim)
    mim.save_pretrained(tmp_path)
    backbone, info = BeitV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    torch.testing.assert_close(backbone.layernorm.weight, mim.layernorm.weight, rtol=0, atol=0)
    # and back: a backbone checkpoint gives the MIM model its backbone and final LayerNorm
    backbone.save_pretrained(tmp_path / "backbone")
    reloaded, info = BeitV2ForMaskedImageModeling.from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert not any(key.startswith(("beit.", "layernorm.")) for key in info["missing_keys"]), info["missing_keys"]
    torch.testing.assert_close(reloaded.layernorm.bias, mim.layernorm.bias, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["mim", "backbone"])
def test_native_feature_extractor_gives_our_features(tmp_path, tiny_beitv2_kwargs, source):
    mim = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).eval()
    randomize_all_parameters(mim)
    mim.save_pretrained(tmp_path / "mim")
    ours = BeitV2Model.from_pretrained(tmp_path / "mim").eval()
    native = convert_to_native_feature_extractor(mim if source == "mim" else ours)
    native.save_pretrained(tmp_path / "native")
    reloaded, info = BeitModel.from_pretrained(tmp_path / "native", output_loading_info=True)
    assert reloaded.config.model_type == "beit" and not reloaded.config.use_mean_pooling
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixel_values, _, _ = make_batch(mim.config)
    with torch.no_grad():
        expected, actual = ours(pixel_values), reloaded.eval()(pixel_values)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_native_feature_extractor_warns_without_patch_aggregation(tiny_beitv2_kwargs):
    mim = BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs, use_patch_aggregation=False)).eval()
    with CaptureLogger(transformers.utils.logging.get_logger("modeling_beitv2.export_native")) as captured:
        native = convert_to_native_feature_extractor(mim)
    assert "without patch aggregation" in captured.out
    pixel_values, _, _ = make_batch(mim.config)
    with torch.no_grad():
        tokens = mim.layernorm(mim.beit(pixel_values).last_hidden_state)
        torch.testing.assert_close(native(pixel_values).last_hidden_state, tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_class", [BeitV2Model, BeitV2ForMaskedImageModeling])
def test_models_build_on_the_meta_device(tiny_beitv2_kwargs, model_class):
    """How device_map, big-model loading and DeepSpeed ZeRO-3 build models."""
    config = BeitV2Config(**tiny_beitv2_kwargs, drop_path_rate=0.1)
    with torch.device("meta"):
        model = model_class(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    reference = model_class(config)
    assert [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")] == [
        m.drop_prob for m in reference.modules() if hasattr(m, "drop_prob")
    ]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_with_the_shared_bias_gives_the_same_gradients(tiny_beitv2_kwargs, use_reentrant):
    """Reentrant checkpointing used to fail on the shared relative position bias (a keyword input computed once
    outside the checkpointed layers); the bias table must get the same gradient as without checkpointing."""
    config = BeitV2Config(**tiny_beitv2_kwargs)
    model = BeitV2ForMaskedImageModeling(config).train()
    randomize_all_parameters(model)
    pixel_values, bool_masked_pos, labels = make_batch(config)
    model(pixel_values, bool_masked_pos, labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert plain["beit.shared_position_bias.relative_position_bias_table"].abs().sum() > 0
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model(pixel_values, bool_masked_pos, labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mim_outputs_backbone_hidden_states_and_attentions(tiny_beitv2_kwargs):
    config = BeitV2Config(**tiny_beitv2_kwargs)
    model = BeitV2ForMaskedImageModeling._from_config(config, attn_implementation="eager").eval()
    randomize_all_parameters(model)
    pixel_values, bool_masked_pos, labels = make_batch(config)
    with torch.no_grad():
        plain = model(pixel_values, bool_masked_pos, labels)
        full = model(pixel_values, bool_masked_pos, labels, output_hidden_states=True, output_attentions=True)
        selected = model(pixel_values, bool_masked_pos, labels, output_hidden_states=[0, -1])
        expected = model.beit(pixel_values, bool_masked_pos, output_hidden_states=True).hidden_states
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(full.loss, plain.loss, rtol=0, atol=0)
    num_layers = config.num_hidden_layers  # the aggregation head's blocks are not included
    assert len(full.hidden_states) == num_layers + 1 and len(full.attentions) == num_layers
    for actual, reference in zip(full.hidden_states, expected):
        torch.testing.assert_close(actual, reference, rtol=0, atol=0)
    assert full.attentions[0].shape == (3, config.num_attention_heads, config.num_patches + 1, config.num_patches + 1)
    assert selected.hidden_states[1:-1] == (None,) * (num_layers - 1)
    torch.testing.assert_close(selected.hidden_states[-1], expected[-1], rtol=0, atol=0)
    model.config.output_hidden_states = True
    with torch.no_grad():
        assert len(model(pixel_values, bool_masked_pos, labels).hidden_states) == num_layers + 1
