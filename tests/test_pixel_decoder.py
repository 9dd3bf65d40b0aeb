"""VQKDPixelDecoder: built from a tokenizer, shapes and range, bad input, save/reload (also as Hub custom code), and
the mean-patch baseline helper of examples/pretraining/pixel_baseline.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_without_package
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel

from modeling_beitv2 import VQKDConfig, VQKDModel, VQKDPixelDecoder, VQKDPixelDecoderConfig
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config
from pretraining.pixel_baseline import MeanPatchBaseline, patchify, psnr, unpatchify

TINY_VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
TINY_DECODER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, refine_channels=8
)


def tiny_tokenizer(**overrides) -> VQKDModel:
    """32 px images, 8 px patches (a 4x4 grid), 64 codes of dimension 8."""
    torch.manual_seed(0)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=1, **TINY_VIT),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **TINY_VIT),
        codebook_size=64,
        code_dim=8,
        teacher_dim=16,
        **{"kmeans_init": False, **overrides},
    )
    return VQKDModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> VQKDModel:
    return tiny_tokenizer()


@pytest.fixture
def decoder(tokenizer) -> VQKDPixelDecoder:
    torch.manual_seed(1)
    return VQKDPixelDecoder.from_tokenizer(tokenizer, **TINY_DECODER).eval()


def random_codes(batch_size: int = 3, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, 64, (batch_size, 16), generator=torch.Generator().manual_seed(seed))


def test_from_tokenizer_copies_its_settings_and_normalised_codebook(tokenizer, decoder):
    config = decoder.config
    assert (config.codebook_size, config.code_dim, config.image_size, config.patch_size) == (64, 8, 32, 8)
    assert (decoder.codebook_size, decoder.image_size, decoder.patch_grid) == (64, 32, (4, 4))
    assert decoder.patch_grid == tokenizer.patch_grid and config.hidden_size == 32
    expected = F.normalize(tokenizer.quantizer.codebook, dim=-1)
    assert torch.equal(decoder.embeddings.codebook, expected)
    # A frozen buffer saved with the decoder, not a trained parameter; nothing of the tokenizer is inside.
    assert "embeddings.codebook" in decoder.state_dict()
    assert all("codebook" not in name for name, _ in decoder.named_parameters())
    assert not any(name.startswith(("encoder", "quantizer", "teacher")) for name in decoder.state_dict())


def test_from_tokenizer_refuses_contradicting_settings_and_an_untrained_codebook(tokenizer):
    with pytest.raises(ValueError, match=r"patch_size=16 \(tokenizer: 8\)"):
        VQKDPixelDecoder.from_tokenizer(tokenizer, patch_size=16)
    VQKDPixelDecoder.from_tokenizer(tokenizer, patch_size=8, **TINY_DECODER)  # the tokenizer's own value is fine
    with pytest.raises(ValueError, match="k-means initialisation"):
        VQKDPixelDecoder.from_tokenizer(tiny_tokenizer(kmeans_init=True))


def test_decode_shapes_range_and_grid_layouts(decoder):
    codes = random_codes()
    pixels = decoder.decode(codes)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1
    # (batch, rows, cols) and (batch, rows * cols) are the same codes in row-major order.
    assert torch.equal(decoder.decode(codes.view(3, 4, 4)), pixels)
    # Each code paints its own patch: changing the code at grid position (1, 2) changes that patch the most.
    changed = codes.clone()
    changed[:, 1 * 4 + 2] = (changed[:, 1 * 4 + 2] + 1) % 64
    difference = (decoder.decode(changed) - pixels).abs().sum(dim=(0, 1))
    per_patch = difference.view(4, 8, 4, 8).sum(dim=(1, 3))
    assert per_patch.argmax() == 1 * 4 + 2


def test_forward_loss_matches_the_configured_pixel_loss(tokenizer):
    torch.manual_seed(0)
    codes, target = random_codes(), torch.rand(3, 3, 32, 32)
    for loss_type, loss_function in (("mse", F.mse_loss), ("l1", F.l1_loss)):
        torch.manual_seed(1)
        decoder = VQKDPixelDecoder.from_tokenizer(tokenizer, loss_type=loss_type, **TINY_DECODER).eval()
        # Push predictions outside [0, 1]: the loss sees the unclamped prediction, `reconstruction` the clamped one.
        with torch.no_grad():
            decoder.head.bias.fill_(1.5)
        unclamped = decoder._paint(codes)
        assert unclamped.max() > 1
        outputs = decoder(input_ids=codes, pixel_values=target)
        torch.testing.assert_close(outputs.loss, loss_function(unclamped, target))
        torch.testing.assert_close(outputs.reconstruction, decoder.decode(codes))
    assert decoder(input_ids=codes).loss is None


def test_starts_as_mid_grey_patches_with_an_identity_refiner(decoder):
    # The zero-initialised last convolution makes the refiner the identity until trained.
    assert torch.equal(decoder.refiner.conv_out.weight, torch.zeros_like(decoder.refiner.conv_out.weight))
    assert torch.equal(decoder.head.bias, torch.full_like(decoder.head.bias, 0.5))
    coarse = torch.rand(2, 3, 32, 32)
    assert torch.equal(decoder.refiner(coarse), coarse)


def test_training_lowers_the_loss(decoder):
    torch.manual_seed(0)
    codes, target = random_codes(4), torch.rand(4, 3, 32, 32)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    decoder.train()
    first = decoder(input_ids=codes, pixel_values=target).loss.item()
    for _ in range(10):
        loss = decoder(input_ids=codes, pixel_values=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first
    assert decoder.embeddings.codebook.grad is None  # the codebook stays frozen


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.full((2, 16), 64), r"\[0, 64\).*from 64 to 64"),
        (torch.full((2, 16), -1), r"\[0, 64\).*from -1 to -1"),
        (torch.zeros(2, 9, dtype=torch.long), r"\(2, 9\) do not match the tokenizer's 4x4 grid"),
        (torch.zeros(2, 2, 8, dtype=torch.long), r"\(2, 2, 8\) do not match the tokenizer's 4x4 grid"),
        (torch.zeros(2, 16), "integer tensor"),
    ],
)
def test_bad_codes_are_clear_errors(decoder, codes, message):
    with pytest.raises(ValueError, match=message):
        decoder.decode(codes)
    with pytest.raises(ValueError, match=message):
        decoder(input_ids=codes)


def test_pixel_values_of_another_shape_are_refused(decoder):
    with pytest.raises(ValueError, match=r"pixel_values has shape \(3, 3, 16, 16\)"):
        decoder(input_ids=random_codes(), pixel_values=torch.rand(3, 3, 16, 16))


def test_config_checks():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VQKDPixelDecoderConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        VQKDPixelDecoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="loss_type must be one of mse, l1; got 'huber'"):
        VQKDPixelDecoderConfig(loss_type="huber")
    assert VQKDPixelDecoderConfig(image_size=32, patch_size=8).patch_grid == (4, 4)
    # Without refiner and without Transformer blocks the decoder still paints.
    decoder = VQKDPixelDecoder(
        VQKDPixelDecoderConfig(
            codebook_size=64,
            code_dim=8,
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=0,
            refine_channels=0,
        )  # fmt: skip
    )
    assert decoder.refiner is None and decoder.decode(random_codes()).shape == (3, 3, 32, 32)


def test_save_reload_gives_identical_pixels(decoder, tmp_path):
    codes = random_codes()
    decoder.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "beitv2_vqkd_pixel_decoder"
    assert saved["auto_map"]["AutoModel"] == "modeling_pixel_decoder.VQKDPixelDecoder"
    for module in ("configuration_pixel_decoder.py", "modeling_pixel_decoder.py"):
        assert (tmp_path / module).exists(), module
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VQKDPixelDecoderConfig)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, VQKDPixelDecoder)
    assert torch.equal(reloaded.embeddings.codebook, decoder.embeddings.codebook)
    assert torch.equal(reloaded.decode(codes), decoder.decode(codes))


@pytest.mark.slow
def test_custom_code_reload_in_fresh_process_gives_identical_pixels(decoder, tmp_path):
    codes = random_codes()
    expected = decoder.decode(codes)
    decoder.save_pretrained(tmp_path / "decoder")
    torch.save(codes, tmp_path / "codes.pt")
    run_without_package(
        """
        import torch
        from transformers import AutoModel
        decoder = AutoModel.from_pretrained("decoder", trust_remote_code=True).eval()
        assert type(decoder).__module__.startswith("transformers_modules"), type(decoder).__module__
        torch.save(decoder.decode(torch.load("codes.pt")), "pixels.pt")
        """,
        cwd=tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "pixels.pt"), expected)


# The mean-patch baseline (examples/pretraining/pixel_baseline.py).


def test_patchify_is_row_major_and_unpatchify_inverts_it():
    pixels = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    patches = patchify(pixels, 2)  # a 2x3 grid of 2x2 patches
    assert patches.shape == (2, 6, 12)
    # Patch 4 is grid row 1, column 1: pixel rows 2-3, columns 2-3 of each channel, channel-major.
    assert torch.equal(patches[0, 4], pixels[0, :, 2:4, 2:4].flatten())
    assert torch.equal(unpatchify(patches, 2, (2, 3), 3), pixels)
    with pytest.raises(ValueError, match="do not split into 4x4 patches"):
        patchify(pixels, 4)


def test_mean_patch_baseline_by_hand():
    # One-channel 2x4 images, 2x2 patches: a 1x2 grid, 3 codes. Code 0 is seen twice, code 1 once, code 2 never.
    baseline = MeanPatchBaseline(codebook_size=3, patch_size=2, patch_grid=(1, 2), num_channels=1)
    image = torch.tensor([[[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]])  # left patch 0s, right patch 1s
    baseline.update(image, torch.tensor([[0, 1]]))
    other = torch.tensor([[[[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]]]])
    baseline.update(other, torch.tensor([[0, 0]]))
    assert baseline.num_patches == 4 and baseline.num_seen_codes == 2
    table = baseline.patch_table()
    assert torch.equal(table[0], torch.full((4,), (0.0 + 0.5 + 0.25) / 3))
    assert torch.equal(table[1], torch.ones(4))
    # The unseen code gets the mean of all 4 patches.
    assert torch.equal(table[2], torch.full((4,), (0.0 + 1.0 + 0.5 + 0.25) / 4))
    painted = baseline.paint(torch.tensor([[2, 1]]))
    expected = torch.tensor([[[[0.4375, 0.4375, 1.0, 1.0], [0.4375, 0.4375, 1.0, 1.0]]]])
    assert torch.equal(painted, expected)
    # (batch, rows, cols) codes paint the same.
    assert torch.equal(baseline.paint(torch.tensor([[[2, 1]]])), expected)


def test_mean_patch_baseline_errors():
    baseline = MeanPatchBaseline(codebook_size=3, patch_size=2, patch_grid=(1, 2), num_channels=1)
    with pytest.raises(ValueError, match="has seen no image yet"):
        baseline.paint(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 2, 4\), got \(1, 3, 2, 4\)"):
        baseline.update(torch.zeros(1, 3, 2, 4), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"codes of shape \(1, 2\), got \(1, 3\)"):
        baseline.update(torch.zeros(1, 1, 2, 4), torch.tensor([[0, 1, 2]]))


def test_psnr_per_image():
    target = torch.zeros(2, 3, 4, 4)
    prediction = target.clone()
    prediction[0] += 0.1  # MSE 0.01 -> 20 dB
    values = psnr(prediction, target)
    assert values.shape == (2,)
    torch.testing.assert_close(values[0], torch.tensor(20.0))
    assert values[1] == 100.0  # a perfect match is capped, not infinite
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(prediction, target[:, :, :2])


def test_an_empty_batch_decodes_to_an_empty_batch(decoder):
    for codes in (torch.zeros(0, 16, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.long)):
        assert decoder.decode(codes).shape == (0, 3, 32, 32)
        assert decoder(input_ids=codes).reconstruction.shape == (0, 3, 32, 32)


def test_eager_attention_matches_sdpa_and_returns_its_weights(decoder):
    eager = type(decoder)._from_config(decoder.config, attn_implementation="eager").eval()
    eager.load_state_dict(decoder.state_dict())
    codes = random_codes()
    with torch.no_grad():
        sdpa_output = decoder.eval()(input_ids=codes, output_hidden_states=True)
        eager_output = eager(input_ids=codes, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(eager_output.reconstruction, sdpa_output.reconstruction, rtol=1e-5, atol=1e-5)
    config = decoder.config
    assert len(eager_output.hidden_states) == config.num_hidden_layers + 1
    assert eager_output.attentions[0].shape == (3, config.num_attention_heads, 16, 16)
    torch.testing.assert_close(eager_output.attentions[0].sum(-1), torch.ones(3, config.num_attention_heads, 16))
    assert sdpa_output.attentions is None
