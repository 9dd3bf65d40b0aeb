"""examples/visualize_codebook.py: grids of the patches of each code (BEiT v2 Figure 4), captioned with the code, its
count and its most frequent classes, the usage histogram and the counts, checked by re-tokenising the images the
patches came from."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from visualize_codebook import (
    CAPTION_HEIGHT,
    GRID_PADDING,
    CodebookUsage,
    VisualizeArguments,
    code_caption,
    main,
    read_images,
    tokenize_views,
    tokenizer_view,
)

from demo_pipeline.data import CLASS_NAMES, write_demo_dataset
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, DVAEConfig, DVAEModel, VQKDConfig, VQKDModel
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config
from pretraining.loop import load_visual_tokenizer

NUM_CODES = 16


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    return write_demo_dataset(root, {"train": 4}, image_size=32)["train"]  # 6 classes x 4 = 24 images


@pytest.fixture(scope="module")
def vqkd_dir(tmp_path_factory):
    torch.manual_seed(0)
    width = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **width),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **width),
        codebook_size=NUM_CODES, code_dim=8, teacher_dim=16, kmeans_init=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vqkd") / "tokenizer"
    VQKDModel(config).save_pretrained(path)
    return path


def retokenize(tokenizer_dir, images_dir):
    """The views and codes of the same images, computed again independently of the script's output."""
    tokenizer = load_visual_tokenizer(str(tokenizer_dir))
    images, _ = read_images(train_dir=str(images_dir), max_images=VisualizeArguments.max_images)
    views = np.stack([tokenizer_view(image, tokenizer) for image in images])
    return views, tokenize_views(tokenizer, views)


def run(tokenizer_dir, images_dir, output_dir, *extra):
    argv = ["--tokenizer_name_or_path", str(tokenizer_dir), "--train_dir", str(images_dir),
            "--output_dir", str(output_dir), "--device", "cpu", *extra]  # fmt: skip
    return main(argv)


def test_top_codes_grids_hold_patches_of_that_code(vqkd_dir, images_dir, tmp_path):
    summary = run(vqkd_dir, images_dir, tmp_path, "--top_k", "3", "--patches_per_code", "10",
                  "--patch_display_size", "16")  # fmt: skip
    views, codes = retokenize(vqkd_dir, images_dir)
    assert views.shape == (24, 32, 32, 3) and codes.shape == (24, 4, 4)

    counts = np.bincount(codes.reshape(-1), minlength=NUM_CODES)
    assert summary["counts"] == counts.tolist()
    assert summary["num_patches"] == 24 * 16 == sum(summary["counts"])
    assert summary["usage_fraction"] == pytest.approx((counts > 0).mean())
    assert json.loads((tmp_path / "codebook_usage.json").read_text()) == summary
    assert (tmp_path / "usage_histogram.png").is_file()

    # The three most used codes, most used first.
    drawn = [int(code) for code in summary["drawn_codes"]]
    assert drawn == sorted(range(NUM_CODES), key=lambda code: (-counts[code], code))[:3]
    assert sorted(p.name for p in tmp_path.glob("code_*.png")) == sorted(f"code_{code}.png" for code in drawn)

    columns = math.ceil(math.sqrt(10))
    assert summary["grid_columns"] == columns
    for code in drawn:
        locations = summary["drawn_codes"][str(code)]["patches"]
        assert len(locations) == min(10, counts[code])
        # Spread over images: as many distinct images as possible among the first patches.
        first = [image for image, _, _ in locations[: min(len(locations), int((codes == code).any((1, 2)).sum()))]]
        assert len(set(first)) == len(first)
        # The grid at its own resolution below the caption strip.
        grid = np.asarray(Image.open(tmp_path / f"code_{code}.png").convert("RGB"))[CAPTION_HEIGHT:]
        rows = math.ceil(len(locations) / columns)
        assert grid.shape == (
            GRID_PADDING + rows * (16 + GRID_PADDING),
            GRID_PADDING + columns * (16 + GRID_PADDING),
            3,
        )
        for position, (image, row, column) in enumerate(locations):
            assert codes[image, row, column] == code  # re-tokenised: the patch really has this code
            top = GRID_PADDING + (position // columns) * (16 + GRID_PADDING)
            left = GRID_PADDING + (position % columns) * (16 + GRID_PADDING)
            shown = grid[top : top + 16 : 2, left : left + 16 : 2]  # nearest 2x upscaling of an 8x8 cell
            np.testing.assert_array_equal(shown, views[image, row * 8 : row * 8 + 8, column * 8 : column * 8 + 8])


def test_codes_from_the_command_line(vqkd_dir, images_dir, tmp_path, tiny_beitv2_kwargs):
    _, codes = retokenize(vqkd_dir, images_dir)
    counts = np.bincount(codes.reshape(-1), minlength=NUM_CODES)
    used, unused = int(np.flatnonzero(counts)[-1]), np.flatnonzero(counts == 0)
    requested = [used] + [int(code) for code in unused[:1]]
    summary = run(vqkd_dir, images_dir, tmp_path, "--codes", *map(str, requested), "--patches_per_code", "4")
    # An unused code gets no grid (and a warning), a used one gets its patches.
    assert list(summary["drawn_codes"]) == [str(used)]
    assert [p.name for p in tmp_path.glob("code_*.png")] == [f"code_{used}.png"]
    assert len(summary["drawn_codes"][str(used)]["patches"]) == min(4, counts[used])

    with pytest.raises(ValueError, match=r"--codes \[99\]"):
        run(vqkd_dir, images_dir, tmp_path, "--codes", "99")
    # Something that is not a visual tokenizer is refused by name.
    mim_dir = tmp_path / "mim"
    BeitV2ForMaskedImageModeling(BeitV2Config(**tiny_beitv2_kwargs)).save_pretrained(mim_dir)
    with pytest.raises(ValueError, match="is a BeitV2Model; expected a VQKDModel or DVAEModel"):
        run(mim_dir, images_dir, tmp_path)


def test_dvae_tokenizer(images_dir, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dvae"
    DVAEModel(DVAEConfig(codebook_size=32, hidden_size=8, num_blocks_per_group=1, image_size=32)).save_pretrained(path)
    summary = run(path, images_dir, tmp_path / "out", "--top_k", "2", "--patches_per_code", "5",
                  "--patch_display_size", "8")  # fmt: skip
    assert summary["num_codes"] == 32 and summary["num_patches"] == 24 * 16  # 32 px / 8 -> 4x4 codes
    views, codes = retokenize(path, images_dir)
    for code, drawn in summary["drawn_codes"].items():
        assert all(codes[image, row, column] == int(code) for image, row, column in drawn["patches"])


def test_usage_statistics_and_location_order():
    indices = np.array([[[0, 0], [1, 0]], [[0, 2], [2, 2]]])  # 2 images, 2x2 grid, 4 codes
    usage = CodebookUsage(np.zeros((2, 4, 4, 3), dtype=np.uint8), indices, num_codes=4)
    assert usage.counts.tolist() == [4, 1, 3, 0]
    assert usage.usage_fraction == 0.75
    probabilities = np.array([4, 1, 3]) / 8
    assert usage.perplexity == pytest.approx(np.exp(-(probabilities * np.log(probabilities)).sum()))
    assert usage.cell_size == 2
    # Code 0: first patch of image 0, first patch of image 1, then the remaining ones of image 0.
    assert usage.locations(0, 10) == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (0, 1, 1)]
    assert usage.locations(3, 10) == []


@pytest.mark.parametrize("kind", ["vqkd", "dvae"])
def test_views_reach_the_tokenizer_as_plain_pixels(kind, vqkd_dir, tmp_path):
    # Both tokenizers map [0, 1] pixels to their own input range: the script must not map them again.
    if kind == "dvae":
        torch.manual_seed(0)
        DVAEModel(DVAEConfig(codebook_size=32, hidden_size=8, num_blocks_per_group=1, image_size=32)).save_pretrained(
            tmp_path / "dvae"
        )
    tokenizer = load_visual_tokenizer(str(vqkd_dir if kind == "vqkd" else tmp_path / "dvae"))
    views = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = tokenizer.get_codebook_indices(torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_array_equal(tokenize_views(tokenizer, views, batch_size=2), expected.view(3, 4, 4).numpy())


def test_captions_name_the_most_frequent_classes(vqkd_dir, images_dir, tmp_path):
    summary = run(vqkd_dir, images_dir, tmp_path / "out", "--top_k", "4", "--patches_per_code", "4")
    _, codes = retokenize(vqkd_dir, images_dir)
    # The images are read in sorted path order: 4 per class folder, classes sorted by name.
    image_classes = np.repeat(sorted(CLASS_NAMES), 4)
    assert summary["labelled"] is True
    for code, drawn in summary["drawn_codes"].items():
        classes, counts = np.unique(image_classes[np.nonzero(codes == int(code))[0]], return_counts=True)
        expected = sorted(zip(classes.tolist(), counts.tolist()), key=lambda entry: (-entry[1], entry[0]))[:3]
        assert drawn["top_classes"] == [list(entry) for entry in expected]
        assert sum(patches for _, patches in drawn["top_classes"]) <= drawn["count"]

    # A flat folder (no class folders) has no labels: no classes in the summary or the captions.
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, path in enumerate(sorted(images_dir.rglob("*.png"))[:6]):
        shutil.copy(path, flat / f"{index}.png")
    summary = run(vqkd_dir, flat, tmp_path / "flat_out", "--top_k", "2")
    assert summary["labelled"] is False
    assert all("top_classes" not in drawn for drawn in summary["drawn_codes"].values())


def test_code_caption():
    assert code_caption(7, 1, []) == "code 7: 1 patch"
    assert (
        code_caption(12, 40, [("dots", 30), ("checkerboard", 10)]) == "code 12: 40 patches\ndots 75%, checkerboard 25%"
    )
    usage = CodebookUsage(
        np.zeros((3, 4, 4, 3), dtype=np.uint8),
        np.array([[[1, 1], [0, 1]], [[1, 0], [0, 0]], [[1, 1], [1, 1]]]),
        num_codes=2,
        labels=np.array([0, 1, 1]),
        class_names=["a", "b"],
    )
    assert usage.top_classes(1) == [("b", 5), ("a", 3)]
    assert usage.top_classes(0, limit=1) == [("b", 3)]
    with pytest.raises(ValueError, match="Give both labels and class_names"):
        CodebookUsage(usage.views, usage.indices, 2, labels=np.array([0, 1, 1]))
