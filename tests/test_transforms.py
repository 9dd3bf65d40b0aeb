import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import pytest
import torch

from processing import (
    CenterCrop,
    ColorJitter,
    Compose,
    RandAugment,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    TwoViewRandomResizedCrop,
    convert_to_rgb,
    to_pil_image,
)
from processing.transforms import to_channel_images


def coordinate_image(width=200, height=150):
    """Red = x, green = y, so every pixel tells where it came from."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return PIL.Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I", 65535, (255, 255, 255)),
        ("F", 0.5, (128, 128, 128)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
        ("LA", (40, 255), (40, 40, 40)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ],
)
def test_convert_to_rgb_modes(mode, value, expected):
    image = PIL.Image.new(mode, (5, 4), value)
    rgb = convert_to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    assert rgb.getpixel((2, 2)) == expected


def test_convert_to_rgb_palette_with_and_without_transparency():
    palette = PIL.Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert convert_to_rgb(palette).getpixel((0, 0)) == (200, 10, 10)
    palette.info["transparency"] = 1
    assert convert_to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_to_pil_image_accepts_arrays_and_tensors():
    hwc = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    reference = np.asarray(to_pil_image(hwc))
    np.testing.assert_array_equal(reference, hwc)
    np.testing.assert_array_equal(np.asarray(to_pil_image(hwc.transpose(2, 0, 1))), hwc)
    chw_float = torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(to_pil_image(chw_float)), hwc)
    gray16 = np.full((3, 3), 257 * 9, dtype=np.uint16)
    assert to_pil_image(gray16).getpixel((0, 0)) == (9, 9, 9)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    assert to_pil_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_input_data_format_overrides_the_inferred_channel_axis():
    # (3, 4, 3): inferred as channels-first (first axis 3, last axis 3 is also a channel count, so channels-last
    # wins only when said); the argument decides.
    image = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_pil_image(image, input_data_format="channels_last")), image)
    np.testing.assert_array_equal(
        np.asarray(to_pil_image(image, input_data_format="channels_first")), image.transpose(1, 2, 0)
    )
    with pytest.raises(ValueError, match="input_data_format must be one of"):
        to_pil_image(image, input_data_format="last")


def test_channel_images_keep_every_channel_as_it_is():
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    for image, layout in (
        (rgba, None),
        (rgba.transpose(2, 0, 1), "channels_first"),
        (PIL.Image.fromarray(rgba), None),
    ):
        planes = to_channel_images(image, layout)
        assert [plane.mode for plane in planes] == ["L"] * 4
        np.testing.assert_array_equal(np.stack([np.asarray(plane) for plane in planes], axis=-1), rgba)
    # Any channel count; 2-D is one channel; dtype rules as to_pil_image.
    assert len(to_channel_images(np.zeros((5, 6, 7), dtype=np.uint8), "channels_last")) == 7
    assert len(to_channel_images(np.zeros((5, 6), dtype=np.float32))) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_channel_images(np.full((5, 6, 2), 3.0))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((4, 4, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((5, 6, 7), dtype=np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3, 1), dtype=np.uint8), "shape"),
        (np.full((4, 4), 300, dtype=np.int32), r"\[0, 255\]"),
        ("not an image", "PIL image"),
    ],
)
def test_to_pil_image_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        to_pil_image(bad)


def test_resize_shorter_side_and_center_crop_with_padding():
    image = coordinate_image(200, 150)
    assert Resize(112)(image).size == (149, 112)  # torchvision: long side int(112 * 200 / 150)
    assert Resize(60)(coordinate_image(30, 90)).size == (60, 180)
    crop = CenterCrop(100)(image)
    assert crop.size == (100, 100)
    assert crop.getpixel((0, 0))[:2] == (50, 25)
    small = PIL.Image.new("RGB", (20, 10), (255, 255, 255))
    padded = np.asarray(CenterCrop(16)(small))
    assert padded.shape == (16, 16, 3)
    assert (padded[:3] == 0).all() and (padded[3:13] == 255).all() and (padded[13:] == 0).all()


def test_horizontal_flip():
    image = coordinate_image(20, 10)
    rng = np.random.default_rng(0)
    assert RandomHorizontalFlip(1.0)(image, rng).getpixel((0, 0))[0] == 19
    assert RandomHorizontalFlip(0.0)(image, rng).getpixel((0, 0))[0] == 0
    flips = sum(RandomHorizontalFlip(0.5)(image, rng).getpixel((0, 0))[0] == 19 for _ in range(2000))
    assert 900 < flips < 1100


def test_random_resized_crop_boxes_follow_torchvision_rules():
    crop = RandomResizedCrop(32, scale=(0.2, 1.0))
    rng = np.random.default_rng(0)
    width, height = 200, 150
    tops, lefts = [], []
    for _ in range(3000):
        top, left, h, w = crop.get_params(width, height, rng)
        assert 0 < h <= height and 0 < w <= width
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # Area and ratio inside their ranges, up to the rounding of h and w.
        assert 0.2 * 0.9 <= h * w / (width * height) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        tops.append(top == height - h)
        lefts.append(left == 0)
    assert any(tops) and any(lefts)
    # No box fits a 1000 x 10 strip with this ratio range: central box clamped to the widest allowed ratio.
    fallback = RandomResizedCrop(8, scale=(0.9, 1.0))
    assert fallback.get_params(1000, 10, rng) == (0, 493, 10, 13)
    assert fallback.get_params(10, 1000, rng) == (493, 0, 13, 10)
    output = crop(coordinate_image(), rng)
    assert output.size == (32, 32)


def test_two_views_come_from_one_crop_box():
    image = coordinate_image(200, 150)
    two_view = TwoViewRandomResizedCrop(
        64, 32, scale=(0.1, 1.0), interpolation="nearest", second_interpolation="nearest"
    )
    for seed in range(20):
        box = two_view.get_params(*image.size, np.random.default_rng(seed))
        top, left, h, w = box
        view, second = two_view(image, np.random.default_rng(seed))
        assert view.size == (64, 64) and second.size == (32, 32)
        for rendered, side in ((np.asarray(view), 64), (np.asarray(second), 32)):
            xs, ys = rendered[..., 0], rendered[..., 1]
            # Nearest sampling hits pixel centres: within one output pixel's footprint of the box edges.
            assert left <= xs.min() <= left + w / side + 1 and left + w - 1 - w / side - 1 <= xs.max() <= left + w - 1
            assert top <= ys.min() <= top + h / side + 1 and top + h - 1 - h / side - 1 <= ys.max() <= top + h - 1


def test_color_jitter_sampling_and_application():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(ColorJitter()(image, np.random.default_rng(0))), np.asarray(image))
    jitter = ColorJitter(brightness=0.4)
    for seed in range(5):
        replay = np.random.default_rng(seed)
        replay.permutation(4)
        factor = replay.uniform(0.6, 1.4)
        expected = PIL.ImageEnhance.Brightness(image).enhance(factor)
        np.testing.assert_array_equal(np.asarray(jitter(image, np.random.default_rng(seed))), np.asarray(expected))
    red = PIL.Image.new("RGB", (4, 4), (255, 0, 0))
    shifted = ColorJitter(hue=0.5)(red, np.random.default_rng(1)).getpixel((0, 0))
    assert shifted != (255, 0, 0)
    full = ColorJitter(0.4, 0.4, 0.4)
    outputs = {np.asarray(full(image, np.random.default_rng(s))).tobytes() for s in range(10)}
    assert len(outputs) == 10


def test_rand_augment_tables_and_operations():
    augment = RandAugment(num_ops=2, magnitude=9)
    # torchvision's tables at bin 9 of 31.
    assert augment._value("Posterize", 9, 100, 100) == 7
    assert math.isclose(augment._value("Solarize", 9, 100, 100), 178.5)
    assert math.isclose(augment._value("Rotate", 9, 100, 100), 9.0)
    assert math.isclose(augment._value("TranslateX", 9, 331, 100), 45.0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    for operation in RandAugment.operations:
        out = augment._apply(image, operation, augment._value(operation, 9, *image.size))
        assert out.size == image.size and out.mode == "RGB"
    translated = np.asarray(augment._apply(image, "TranslateX", 5.0))
    np.testing.assert_array_equal(translated[:, 5:], np.asarray(image)[:, :-5])
    assert (translated[:, :5] == 0).all()
    assert RandAugment(num_ops=0)(image, np.random.default_rng(0)) is image
    first = np.asarray(augment(image, np.random.default_rng(3)))
    np.testing.assert_array_equal(first, np.asarray(augment(image, np.random.default_rng(3))))
    noisy = RandAugment(magnitude=9, magnitude_std=0.5)
    assert noisy(image, np.random.default_rng(0)).size == image.size


def test_random_erasing():
    pixels = np.ones((3, 40, 40), dtype=np.float32)
    rng = np.random.default_rng(0)
    assert RandomErasing(p=0.0)(pixels, rng) is pixels
    erased_fractions = []
    for _ in range(200):
        erased = RandomErasing(p=1.0, value=0.0)(pixels, rng)
        fraction = (erased[0] == 0).mean()
        erased_fractions.append(fraction)
        assert ((erased == 0).all(axis=0) == (erased[0] == 0)).all()
    assert min(erased_fractions) > 0.015 and max(erased_fractions) < 0.36
    noise = RandomErasing(p=1.0, value="random")(pixels, rng)
    changed = noise != 1
    assert changed.any() and abs(noise[changed].mean()) < 0.5
    assert np.array_equal(pixels, np.ones_like(pixels)), "the input must not be modified"
    with pytest.raises(ValueError, match="shape"):
        RandomErasing(p=1.0)(pixels[0], rng)


def test_compose_passes_rng():
    pipeline = Compose([RandomHorizontalFlip(1.0), Resize(10), CenterCrop(10)])
    out = pipeline(coordinate_image(40, 20), np.random.default_rng(0))
    assert out.size == (10, 10) and out.getpixel((0, 0))[0] > 20


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: RandomResizedCrop(32, interpolation="cubic"), "interpolation"),
        (lambda: RandomResizedCrop(32, scale=(0.5, 0.2)), "scale"),
        (lambda: RandomResizedCrop(32, ratio=(0.0, 1.0)), "ratio"),
        (lambda: RandomResizedCrop(0), "size"),
        (lambda: ColorJitter(hue=0.7), "hue"),
        (lambda: ColorJitter(brightness=-1), "brightness"),
        (lambda: RandAugment(magnitude=31), "magnitude"),
        (lambda: RandomErasing(value="noise"), "value"),
        (lambda: RandomHorizontalFlip(2.0), "p must"),
    ],
)
def test_transform_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
