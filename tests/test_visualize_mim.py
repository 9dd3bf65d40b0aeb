"""examples/visualize_mim.py: one PNG grid per image set (original | masked input | tokenizer codes decoded | predicted
codes decoded), for BEiT v2 (VQ-KD + pixel decoder) and BEiT v1 (dVAE, which decodes its own codes). Every panel is
recomputed independently from the saved models."""

import numpy as np
import pytest
import torch
from PIL import Image
from visualize_mim import COLUMN_TITLES, MASK_GREY, main

from demo_pipeline.data import write_demo_dataset
from modeling_beitv2 import (
    BeitV2Config,
    BeitV2ForMaskedImageModeling,
    DVAEConfig,
    DVAEModel,
    VQKDConfig,
    VQKDModel,
    VQKDPixelDecoder,
)
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config
from pretraining.plots import DPI, GRID_CAPTION_HEIGHT, GRID_HEADER_HEIGHT
from processing import BeitV2ImageProcessor

NUM_CODES, NUM_MASKED, PANEL = 16, 6, 64


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("patterns"), {"validation": 1}, image_size=40)["validation"]


def save_mim(path, tiny_kwargs, processor):
    BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_kwargs)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def beitv2(tmp_path_factory):
    """A tiny VQ-KD tokenizer, its pixel decoder and a BEiT v2 MIM model, saved."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("beitv2")
    width = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    tokenizer = VQKDModel(
        VQKDConfig(
            encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=1, **width),
            decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **width),
            codebook_size=NUM_CODES, code_dim=8, teacher_dim=16, kmeans_init=False,
        )
    )  # fmt: skip
    tokenizer.save_pretrained(root / "vqkd")
    VQKDPixelDecoder.from_tokenizer(tokenizer, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                    num_hidden_layers=1).save_pretrained(root / "decoder")  # fmt: skip
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, vocab_size=NUM_CODES, early_layers=1, head_layers=1)  # fmt: skip
    processor = BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=32,
                                     num_masking_patches=NUM_MASKED)  # fmt: skip
    save_mim(root / "mim", kwargs, processor)
    return root


@pytest.fixture(scope="module")
def beit_v1(tmp_path_factory):
    """A tiny dVAE and a BEiT v1-style MIM model (no patch aggregation), saved."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("beit_v1")
    DVAEModel(
        DVAEConfig(codebook_size=NUM_CODES, hidden_size=8, num_blocks_per_group=1, image_size=32)
    ).save_pretrained(root / "dvae")
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, vocab_size=NUM_CODES, use_patch_aggregation=False)  # fmt: skip
    processor = BeitV2ImageProcessor.for_beit_v1(image_size=32, patch_size=8, tokenizer_image_size=32,
                                                 num_masking_patches=NUM_MASKED)  # fmt: skip
    save_mim(root / "mim", kwargs, processor)
    return root


def check_grid(summary, images_dir, model_dir, tokenizer, renderer, num_images, seed):
    """The PNG has the documented size, and every panel is what the models give when run again here."""
    result = summary["result"]
    with Image.open(summary["output"]) as png:
        assert png.size == (
            len(COLUMN_TITLES) * PANEL,
            GRID_HEADER_HEIGHT + num_images * (GRID_CAPTION_HEIGHT + PANEL),
        )
        assert png.info.get("dpi", (DPI, DPI))[0] == pytest.approx(DPI, abs=1)
    assert result.panels.shape == (num_images, 4, 32, 32, 3)
    assert result.bool_masked_pos.shape == (num_images, 16)
    assert (result.bool_masked_pos.sum(1) == NUM_MASKED).all()

    # The same images through the saved processor's evaluation path, with the same seed.
    images = [Image.open(path).convert("RGB") for path in sorted(images_dir.rglob("*.png"))[:num_images]]
    processor = BeitV2ImageProcessor.from_pretrained(model_dir)
    inputs = processor.pretraining_inputs(images, rng=np.random.default_rng(seed), return_tensors="pt")
    mask = inputs["bool_masked_pos"].bool()
    torch.testing.assert_close(result.bool_masked_pos, mask)
    codes = tokenizer.get_codebook_indices(inputs["tokenizer_pixel_values"])
    torch.testing.assert_close(result.codes, codes)
    model = BeitV2ForMaskedImageModeling.from_pretrained(model_dir).eval()
    with torch.no_grad():
        predictions = model(pixel_values=inputs["pixel_values"], bool_masked_pos=mask).logits.argmax(-1)
    # Visible patches keep their codes; masked ones get the model's predictions, in row-major order.
    torch.testing.assert_close(result.predicted_codes[~mask], codes[~mask])
    torch.testing.assert_close(result.predicted_codes[mask], predictions)
    accuracy = (predictions == codes[mask]).float().mean().item()
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert (
        result.image_correct == (predictions.view(num_images, -1) == codes[mask].view(num_images, -1)).sum(1).tolist()
    )

    panels = torch.from_numpy(result.panels).permute(0, 1, 4, 2, 3)  # (B, 4, 3, H, W)
    original = inputs["tokenizer_pixel_values"]
    torch.testing.assert_close(panels[:, 0], original)
    pixel_mask = mask.view(-1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3).expand_as(original)
    torch.testing.assert_close(panels[:, 1][pixel_mask], torch.full_like(original[pixel_mask], MASK_GREY))
    torch.testing.assert_close(panels[:, 1][~pixel_mask], original[~pixel_mask])
    with torch.no_grad():
        torch.testing.assert_close(panels[:, 2], renderer.decode(codes).clamp(0, 1))
        torch.testing.assert_close(panels[:, 3], renderer.decode(result.predicted_codes).clamp(0, 1))


def test_beitv2_grid_with_the_pixel_decoder(beitv2, images_dir, tmp_path):
    argv = ["--model_name_or_path", str(beitv2 / "mim"), "--tokenizer_name_or_path", str(beitv2 / "vqkd"),
            "--decoder_name_or_path", str(beitv2 / "decoder"), "--image_dir", str(images_dir), "--num_images", "3",
            "--seed", "5", "--panel_size", str(PANEL), "--output", str(tmp_path / "v2.png"), "--device", "cpu"]  # fmt: skip
    summary = main(argv)
    tokenizer = VQKDModel.from_pretrained(beitv2 / "vqkd").eval()
    decoder = VQKDPixelDecoder.from_pretrained(beitv2 / "decoder").eval()
    check_grid(summary, images_dir, beitv2 / "mim", tokenizer, decoder, num_images=3, seed=5)

    # The seed picks the masks: the same seed draws them again, another seed draws others.
    again = main(argv[:-2] + ["--output", str(tmp_path / "again.png")])
    torch.testing.assert_close(again["result"].bool_masked_pos, summary["result"].bool_masked_pos)
    argv[argv.index("--seed") + 1] = "6"
    other = main(argv)
    assert not torch.equal(other["result"].bool_masked_pos, summary["result"].bool_masked_pos)

    # A VQ-KD tokenizer has no decoder of its own.
    without_decoder = argv[: argv.index("--decoder_name_or_path")] + argv[argv.index("--decoder_name_or_path") + 2 :]
    with pytest.raises(ValueError, match="pass --decoder_name_or_path"):
        main(without_decoder)


def test_beit_v1_grid_with_the_dvae(beit_v1, images_dir, tmp_path):
    summary = main(["--model_name_or_path", str(beit_v1 / "mim"), "--tokenizer_name_or_path", str(beit_v1 / "dvae"),
                    "--image_dir", str(images_dir), "--num_images", "2", "--panel_size", str(PANEL),
                    "--output", str(tmp_path / "v1.png"), "--device", "cpu"])  # fmt: skip
    dvae = DVAEModel.from_pretrained(beit_v1 / "dvae").eval()
    check_grid(summary, images_dir, beit_v1 / "mim", dvae, dvae, num_images=2, seed=0)


def test_mask_ratio_and_mismatched_models(beitv2, beit_v1, images_dir, tmp_path):
    common = ["--image_dir", str(images_dir), "--num_images", "1", "--panel_size", str(PANEL), "--device", "cpu",
              "--output", str(tmp_path / "grid.png")]  # fmt: skip
    v1 = ["--model_name_or_path", str(beit_v1 / "mim"), "--tokenizer_name_or_path", str(beit_v1 / "dvae")]
    summary = main(v1 + common + ["--mask_ratio", "0.75"])
    assert summary["result"].bool_masked_pos.sum() == 12  # 75% of 16, overriding the processor's exact count
    with pytest.raises(ValueError, match=r"--mask_ratio must lie in \(0, 1\)"):
        main(v1 + common + ["--mask_ratio", "1.5"])
    # The v1 model (16 codes) with a dVAE of another codebook size.
    DVAEModel(DVAEConfig(codebook_size=32, hidden_size=8, num_blocks_per_group=1, image_size=32)).save_pretrained(
        tmp_path / "dvae32"
    )
    with pytest.raises(ValueError, match="predicts 16 codes but the tokenizer has 32"):
        main(["--model_name_or_path", str(beit_v1 / "mim"), "--tokenizer_name_or_path", str(tmp_path / "dvae32")]
             + common)  # fmt: skip
