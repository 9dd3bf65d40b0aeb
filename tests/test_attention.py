"""The relative position bias and the attention implementations of BEiT v2 (modeling_beitv2/attention.py)."""

from __future__ import annotations

import json
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
import transformers.integrations.flex_attention as transformers_flex_integration
from transformers import BeitConfig, BeitModel
from transformers.models.beit.modeling_beit import BeitRelativePositionBias, eager_attention_forward

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, BeitV2Model, convert_mim_to_native_beit
from modeling_beitv2 import attention as attention_module
from modeling_beitv2.attention import (
    BEIT_FLEX_ATTENTION,
    BeitV2RelativePositionBias,
    FlexAttentionOptions,
    beit_flex_attention_forward,
    get_flex_attention_options,
    relative_position_index,
    set_flex_attention_options,
)

# A 2-block model with a 1-block aggregation head: three attention calls per forward (eager FlexAttention on CPU
# retraces its score_mod on every call, about a second each).
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    vocab_size=64,
    early_layers=1,
    head_layers=1,
)


@pytest.fixture(autouse=True)
def quiet_eager_flex_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """PyTorch refuses FlexAttention backward on CPU up front (`_validate_device`), though its eager implementation
    (the dense math and autograd formula that CUDA eager mode uses) runs on any device. Lifting that check lets the
    CPU tests compare our score_mod's gradients, the relative position bias's included, with eager attention."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)


@pytest.fixture
def restore_flex_options():
    previous = get_flex_attention_options()
    yield
    set_flex_attention_options(previous.kernel_options, previous.compile, previous.compile_mode)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (the bias table included: zeros would hide a wrong bias)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (1.0 if param.ndim == 1 else 0.0))
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator))


def make_inputs(config: BeitV2Config, batch_size: int = 2, num_masked: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator)
    bool_masked_pos = torch.zeros(batch_size, config.num_patches, dtype=torch.bool)
    for row in bool_masked_pos:
        row[torch.randperm(config.num_patches, generator=generator)[:num_masked]] = True
    labels = torch.randint(0, config.vocab_size, (batch_size, config.num_patches), generator=generator)
    return pixel_values, bool_masked_pos, labels


def build(implementation: str, state_dict: dict | None = None, **overrides) -> BeitV2ForMaskedImageModeling:
    model = BeitV2ForMaskedImageModeling._from_config(
        BeitV2Config(**{**SMALL, **overrides}), attn_implementation=implementation
    )
    if state_dict is None:
        randomize(model)
    else:
        model.load_state_dict(state_dict)
    return model


def attention_inputs(batch: int = 2, heads: int = 3, tokens: int = 10, head_dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    bias = torch.randn(1, heads, tokens, tokens, generator=generator) * 2
    return query, key, value, bias


# ------------------------------------------------------------------------------------------ relative position bias


@pytest.mark.parametrize("window", [(4, 4), (14, 14), (3, 5), (1, 1)])
def test_relative_position_index_matches_transformers(window):
    expected = BeitRelativePositionBias.generate_relative_position_index(window)
    assert torch.equal(relative_position_index(window), expected)
    assert relative_position_index(window, device="meta").device.type == "meta"


def test_position_bias_skips_the_identity_resize_and_matches_transformers():
    config = BeitConfig(image_size=32, patch_size=8, num_attention_heads=3)
    ours, theirs = BeitV2RelativePositionBias(config), BeitRelativePositionBias(config)
    with torch.no_grad():
        theirs.relative_position_bias_table.normal_()
    ours.load_state_dict(theirs.state_dict())
    interpolate = torch.nn.functional.interpolate
    with mock.patch.object(torch.nn.functional, "interpolate", wraps=interpolate) as spy:
        bias = ours((4, 4), dim_size=17)
    assert spy.call_count == 0 and bias.shape == (1, 3, 17, 17) and bias.is_contiguous()
    reference = theirs((4, 4), dim_size=17)
    assert torch.equal(bias, reference)
    (bias * reference.detach()).sum().backward()
    (reference * reference.detach()).sum().backward()
    assert torch.equal(ours.relative_position_bias_table.grad, theirs.relative_position_bias_table.grad)
    # Another grid keeps transformers' bilinear resize of the table.
    with mock.patch.object(torch.nn.functional, "interpolate", wraps=interpolate) as spy:
        resized = ours((6, 6), dim_size=37)
    assert spy.call_count == 1
    assert torch.equal(resized, theirs((6, 6), dim_size=37))


def test_backbone_computes_the_shared_bias_once_per_forward_and_the_index_survives_reloading(tmp_path):
    model = build("eager")
    calls = []
    model.beit.shared_position_bias.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    pixel_values, bool_masked_pos, labels = make_inputs(model.config)
    model(pixel_values, bool_masked_pos, labels)
    assert calls == [(1, 4, 17, 17)]  # the two blocks and the aggregation head share one computation
    model.save_pretrained(tmp_path)
    reloaded = BeitV2ForMaskedImageModeling.from_pretrained(tmp_path)
    index = reloaded.beit.shared_position_bias.relative_position_index
    assert torch.equal(index, relative_position_index((4, 4)))
    assert "relative_position_index" not in " ".join(reloaded.state_dict())


# ------------------------------------------------------------------------------------- the attention function


def test_transformers_flex_attention_gives_every_head_the_bias_of_head_zero():
    # Why we register our own function: with a per-head bias, transformers' flex_attention is wrong.
    query, key, value, bias = attention_inputs()
    module = torch.nn.Module().eval()
    expected, _ = eager_attention_forward(module, query, key, value, bias, scaling=0.5)
    # Their score_mod indexes the mask's batch dimension with the image index, so it needs a full-batch mask; and
    # their compiled kernel crashes on CPU, so their score_mod runs in eager FlexAttention here.
    full_batch_bias = bias.expand(2, -1, -1, -1).contiguous()
    with mock.patch.object(
        transformers_flex_integration,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: torch_flex.flex_attention(query, key, value, **kwargs),
    ):
        theirs, _ = transformers_flex_integration.flex_attention_forward(
            module, query, key, value, full_batch_bias, scaling=0.5
        )
    head_zero_bias = bias[:, :1].expand_as(bias)
    with_head_zero_bias, _ = eager_attention_forward(module, query, key, value, head_zero_bias, scaling=0.5)
    torch.testing.assert_close(theirs, with_head_zero_bias, rtol=1e-5, atol=1e-5)
    assert (theirs - expected).abs().max() > 0.1
    ours, weights = beit_flex_attention_forward(module, query, key, value, bias, scaling=0.5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert weights is None and ours.shape == (2, 10, 3, 8)


@pytest.mark.parametrize(
    "mask_kind", ["per_head_bias", "per_image_and_head_bias", "shared_across_heads", "boolean", "none"]
)
def test_flex_attention_forward_and_gradients_match_eager(flex_backward_on_cpu, mask_kind):
    query, key, value, bias = attention_inputs()
    if mask_kind == "per_image_and_head_bias":
        bias = torch.randn(2, 3, 10, 10)
    elif mask_kind == "shared_across_heads":
        bias = bias[:, :1]
    elif mask_kind == "boolean":
        bias = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(1)) > 0.3
        bias[..., 0] = True  # every query sees at least one key
    elif mask_kind == "none":
        bias = None
    grads = {}
    outputs = {}
    for name, function in (("eager", eager_attention_forward), ("flex", beit_flex_attention_forward)):
        inputs = [tensor.clone().requires_grad_(True) for tensor in (query, key, value)]
        mask = bias
        if bias is not None and bias.is_floating_point():
            mask = bias.clone().requires_grad_(True)
            inputs.append(mask)
        elif bias is not None and name == "eager":
            mask = torch.zeros(bias.shape).masked_fill(~bias, float("-inf"))
        outputs[name], _ = function(torch.nn.Module(), *inputs[:3], mask, scaling=0.3)
        outputs[name].pow(2).sum().backward()
        grads[name] = [tensor.grad for tensor in inputs]
    torch.testing.assert_close(outputs["flex"], outputs["eager"], rtol=1e-5, atol=1e-5)
    for flex_grad, eager_grad in zip(grads["flex"], grads["eager"]):
        torch.testing.assert_close(flex_grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_flex_attention_rejects_dropout_and_malformed_masks():
    query, key, value, bias = attention_inputs()
    with pytest.raises(ValueError, match=r"attention dropout \(got 0.1\).*'sdpa' or 'eager'"):
        beit_flex_attention_forward(torch.nn.Module(), query, key, value, bias, dropout=0.1)
    with pytest.raises(ValueError, match=r"4-D attention_mask.*got shape \(3, 10, 10\)"):
        beit_flex_attention_forward(torch.nn.Module(), query, key, value, bias[0])


def test_flex_options_reach_the_kernel_and_choose_compilation(restore_flex_options):
    previous = set_flex_attention_options(kernel_options={"BLOCK_M": 32, "BLOCK_N": 32})
    assert previous == FlexAttentionOptions()
    query, key, value, bias = attention_inputs()
    with mock.patch.object(attention_module, "flex_attention", wraps=torch_flex.flex_attention) as spy:
        beit_flex_attention_forward(torch.nn.Module(), query, key, value, bias)
    assert spy.call_args.kwargs["kernel_options"] == {"BLOCK_M": 32, "BLOCK_N": 32}
    # Eager FlexAttention on CPU by default, the compiled kernel (one per process and mode) elsewhere.
    assert attention_module._flex_attention_function("cpu") is torch_flex.flex_attention
    compiled = attention_module._flex_attention_function("cuda")
    assert compiled is not torch_flex.flex_attention and compiled is attention_module._compiled_flex_attention(None)
    set_flex_attention_options(compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert attention_module._flex_attention_function("cpu") is attention_module._compiled_flex_attention(
        "max-autotune-no-cudagraphs"
    )
    set_flex_attention_options(compile=False)
    assert attention_module._flex_attention_function("cuda") is torch_flex.flex_attention
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        set_flex_attention_options(compile=True)
        assert attention_module._flex_attention_function("cuda") is torch_flex.flex_attention


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_options": [("BLOCK_M", 64)]}, "kernel_options must be a mapping"),
        ({"compile": "yes"}, "compile must be True, False or None"),
        ({"compile_mode": "fastest"}, r"Unknown compile_mode 'fastest'; choose one of \[None, 'default'"),
    ],
)
def test_flex_options_reject_bad_values(restore_flex_options, kwargs, message):
    with pytest.raises(ValueError, match=message):
        set_flex_attention_options(**kwargs)


# ---------------------------------------------------------------------------------------- selecting the models


def test_implementation_is_selectable_and_transformers_flex_attention_is_refused(tmp_path):
    model = build("sdpa")
    assert BeitV2Config(**SMALL)._attn_implementation is None  # transformers' default applies: sdpa
    assert BeitV2ForMaskedImageModeling(BeitV2Config(**SMALL)).config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
    reloaded = BeitV2ForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation=BEIT_FLEX_ATTENTION)
    assert reloaded.config._attn_implementation == BEIT_FLEX_ATTENTION
    assert reloaded.aggregation_head.layers[0].attention.config._attn_implementation == BEIT_FLEX_ATTENTION
    pixel_values, bool_masked_pos, labels = make_inputs(model.config)
    flex_spy = mock.patch.object(attention_module, "flex_attention", wraps=torch_flex.flex_attention)
    with flex_spy as spy, torch.no_grad():
        reloaded(pixel_values, bool_masked_pos, labels)
    assert spy.call_count == 3  # two backbone blocks, one aggregation block
    reloaded.set_attn_implementation("eager")
    assert reloaded.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="head 0's relative position bias to every head. Use 'beit_flex_attention'"):
        BeitV2ForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="head 0's"):
        BeitV2Model._from_config(BeitV2Config(**SMALL), attn_implementation="flex_attention")


# ------------------------------------------------------------------------- every implementation equals eager


def _forward_backward(model, inputs, autocast_dtype=None):
    pixel_values, bool_masked_pos, labels = inputs
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        output = model(pixel_values, bool_masked_pos, labels, output_hidden_states=True, num_masked_patches=6)
    model.zero_grad()
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return output, grads


@pytest.mark.parametrize("implementation", ["sdpa", BEIT_FLEX_ATTENTION])
@pytest.mark.parametrize(
    ("autocast_dtype", "tolerance"), [(None, 1e-5), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16_autocast"]
)
def test_mim_with_aggregation_matches_eager(flex_backward_on_cpu, implementation, autocast_dtype, tolerance):
    eager = build("eager")
    other = build(implementation, eager.state_dict())
    inputs = make_inputs(eager.config)
    expected, expected_grads = _forward_backward(eager, inputs, autocast_dtype)
    actual, actual_grads = _forward_backward(other, inputs, autocast_dtype)
    for field in ("loss", "loss_mim", "loss_aggregation", "logits", "aggregation_logits"):
        torch.testing.assert_close(actual[field], expected[field], rtol=tolerance, atol=tolerance, msg=field)
    for layer, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance, msg=f"backbone hidden state {layer}")
    table = "beit.shared_position_bias.relative_position_bias_table"
    assert actual_grads[table].abs().sum() > 0
    for name, grad in expected_grads.items():
        # bf16 gradients of the large early-layer weights differ by a few bf16 steps: compare relative to the size
        scale = 1.0 if autocast_dtype is None else max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual_grads[name], grad, rtol=tolerance, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", BEIT_FLEX_ATTENTION])
def test_backbone_and_native_export_match_eager(flex_backward_on_cpu, tmp_path, implementation):
    eager = build("eager")
    other = build(implementation, eager.state_dict())
    pixel_values, bool_masked_pos, _ = make_inputs(eager.config)
    outputs, grads = {}, {}
    for name, model in (("eager", eager), ("other", other)):
        hidden = model.beit(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        hidden.pow(2).mean().backward()
        outputs[name] = hidden
        grads[name] = {n: p.grad for n, p in model.beit.named_parameters()}
    torch.testing.assert_close(outputs["other"], outputs["eager"], rtol=1e-5, atol=1e-5)
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["other"][name], grad, rtol=1e-5, atol=1e-5, msg=name)

    # The exported model is plain transformers: its config names an implementation transformers has.
    native = convert_mim_to_native_beit(other, BeitModel).eval()
    assert native.config._attn_implementation in ("eager", "sdpa")
    native.save_pretrained(tmp_path)
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
    with torch.no_grad():
        exported = native(pixel_values).last_hidden_state
        expected = other.eval().beit(pixel_values).last_hidden_state
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)


def test_padding_mask_is_applied_on_top_of_the_bias_by_every_implementation():
    # transformers' BeitModel adds SDPA's boolean padding mask to the float bias (True becomes +1, nothing is
    # masked), and would drop the mask of an implementation it has no mask function for.
    eager = build("eager").eval()
    pixel_values, _, _ = make_inputs(eager.config)
    padding = torch.ones(2, 17, dtype=torch.long)
    padding[1, -5:] = 0
    with torch.no_grad():
        unmasked = eager.beit(pixel_values).last_hidden_state
        expected = eager.beit(pixel_values, attention_mask=padding).last_hidden_state
        for implementation in ("sdpa", BEIT_FLEX_ATTENTION):
            other = build(implementation, eager.state_dict()).eval()
            actual = other.beit(pixel_values, attention_mask=padding).last_hidden_state
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=implementation)
    torch.testing.assert_close(expected[0], unmasked[0], rtol=1e-5, atol=1e-5)  # nothing masked in image 0
    assert (expected[1] - unmasked[1]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_compiled_flex_attention_matches_eager_on_gpu():
    # The Triton kernel (forward and backward, the bias gradient included), at BEiT's awkward 197 tokens.
    generator = torch.Generator(device="cuda").manual_seed(0)
    query, key, value = (
        torch.randn(4, 12, 197, 64, device="cuda", generator=generator, requires_grad=True) for _ in range(3)
    )
    bias = torch.randn(1, 12, 197, 197, device="cuda", generator=generator, requires_grad=True)
    grads = {}
    outputs = {}
    for name, function in (("eager", eager_attention_forward), ("flex", beit_flex_attention_forward)):
        outputs[name], _ = function(torch.nn.Module(), query, key, value, bias, scaling=0.125)
        grads[name] = torch.autograd.grad(outputs[name].pow(2).sum(), (query, key, value, bias))
    torch.testing.assert_close(outputs["flex"], outputs["eager"], rtol=1e-4, atol=1e-4)
    for flex_grad, eager_grad in zip(grads["flex"], grads["eager"]):
        torch.testing.assert_close(flex_grad, eager_grad, rtol=1e-3, atol=1e-3)
