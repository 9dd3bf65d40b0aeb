import dataclasses
import pickle

import numpy as np
import PIL.Image
import pytest

from processing import (
    BeitV2ImageProcessor,
    ClassificationAugmentation,
    ColorJitter,
    RandAugment,
    RandomHorizontalFlip,
    RandomResizedCrop,
    SegmentationAugmentation,
    SingleViewAugmentation,
    TwoViewAugmentation,
    TwoViewRandomResizedCrop,
    VQKDImageProcessor,
)


def texture(width=61, height=47):
    """A deterministic image with structure in every channel (no random draws, so it is the same everywhere)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([(3 * xs + ys) % 256, (xs * ys) % 251, (5 * ys + 40 * np.sin(xs / 4)).astype(int) % 256], -1)
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def summary(array) -> tuple[int, int]:
    """Sum of an `(H, W[, C])` integer image and its sum weighted by column (which a flip changes)."""
    array = np.asarray(array).astype(np.int64)
    columns = np.arange(array.shape[1]).reshape(1, -1, *([1] * (array.ndim - 2)))
    return int(array.sum()), int((array * columns).sum())


def to_uint8(chw):
    return np.rint(np.asarray(chw).transpose(1, 2, 0) * 255).astype(np.uint8)


def labels_for(image):
    return (np.arange(image.width)[None, :] // 5 + np.arange(image.height)[:, None] // 7).astype(np.int64) % 150


# Outputs of the previous implementation (image processors with `set_seed(np.random.default_rng(seed))` and
# `do_augment=True`; the fine-tuning scripts' hand-written `build_transforms`) for seeds 0..3 on `texture()`:
# (backbone view, tokenizer view, masked patch indices) as `summary` of the uint8 pixels.
PREVIOUS_MIM = {
    "v2": [
        ((227021, 3674921), (56750, 444948), [1, 2, 3, 4, 8, 13]),
        ((249496, 3434337), (62426, 414795), [0, 1, 2, 4, 5, 6]),
        ((429520, 6856387), (107423, 830432), [0, 1, 3, 4, 5, 7]),
        ((426082, 6188826), (106696, 748357), [2, 3, 6, 7, 13, 14]),
    ],
    "v1": [
        ((226509, 3654402), (56621, 442378), [0, 3, 6, 10, 11, 13]),
        ((234622, 3303930), (58724, 399384), [4, 6, 7, 8, 10, 11]),
        ((430008, 6793867), (107492, 822120), [2, 3, 4, 8, 14, 15]),
        ((429150, 6241834), (107425, 754293), [0, 1, 5, 8, 13, 14]),
    ],
}
PREVIOUS_VQKD = [(197521, 2123384), (175309, 2204695), (217564, 2447723), (200892, 2355817)]
PREVIOUS_CLASSIFICATION = [(196839, 2116586), (90405, 627915), (201925, 2250891), (175456, 1826834)]
PREVIOUS_SEGMENTATION = [
    ((536994, 9880713), (11240, 185140)),
    ((653762, 12124335), (17800, 308460)),
    ((485650, 10426814), (51872, 1062408)),
    ((290514, 6166545), (204626, 3250673)),
]


@pytest.mark.parametrize("preset", ["v2", "v1"])
def test_mim_training_views_and_masks_equal_the_previous_implementation(preset):
    settings = {"image_size": 32, "patch_size": 8, "tokenizer_image_size": 16, "image_mean": (0,) * 3}
    settings["image_std"] = (1,) * 3
    if preset == "v2":
        processor = BeitV2ImageProcessor(min_num_patches=2, **settings)
    else:
        processor = BeitV2ImageProcessor.for_beit_v1(mask_type="random", **settings)
    augmentation = processor.training_augmentation()
    for seed, expected in enumerate(PREVIOUS_MIM[preset]):
        out = processor.pretraining_inputs(
            texture(), augmentation=augmentation, rng=np.random.default_rng(seed), return_tensors="np"
        )
        got = (
            summary(to_uint8(out["pixel_values"][0])),
            summary(to_uint8(out["tokenizer_pixel_values"][0])),
            np.flatnonzero(out["bool_masked_pos"][0]).tolist(),
        )
        assert got == expected, f"seed {seed}"


def test_vqkd_classification_and_segmentation_equal_the_previous_implementation():
    vqkd = VQKDImageProcessor(image_size=24)
    classification = ClassificationAugmentation(image_size=24)
    segmentation = SegmentationAugmentation(crop_size=40)
    image = texture()
    for seed in range(4):
        out = vqkd.pretraining_inputs(
            image, augmentation=vqkd.training_augmentation(), rng=np.random.default_rng(seed)
        )
        assert summary(to_uint8(out["pixel_values"][0])) == PREVIOUS_VQKD[seed]
        assert summary(classification(image, np.random.default_rng(seed))) == PREVIOUS_CLASSIFICATION[seed]
        pixels, labels = segmentation(image, labels_for(image), np.random.default_rng(seed))
        assert labels.dtype == np.int64 and (summary(pixels), summary(labels)) == PREVIOUS_SEGMENTATION[seed]


def test_augmentations_are_their_operations_in_order():
    # Written out with the primitive operations: the same generator, the same draws, in the documented order.
    image = texture()
    two_view = TwoViewAugmentation(image_size=32, tokenizer_image_size=16, color_jitter=0.3, crop_scale=(0.3, 0.9))
    rng = np.random.default_rng(5)
    expected = ColorJitter(0.3, 0.3, 0.3)(image, rng)
    expected = RandomHorizontalFlip(0.5)(expected, rng)
    expected = TwoViewRandomResizedCrop(32, 16, (0.3, 0.9), (3 / 4, 4 / 3), "bicubic", "bicubic")(expected, rng)
    got = two_view(image, np.random.default_rng(5))
    assert [view.size for view in got] == [(32, 32), (16, 16)]
    for view, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(view), np.asarray(reference))

    rng = np.random.default_rng(6)
    expected = RandomHorizontalFlip(0.5)(RandomResizedCrop(24, (0.5, 1.0), interpolation="bilinear")(image, rng), rng)
    got = SingleViewAugmentation(24, crop_scale=(0.5, 1.0), interpolation="bilinear")(image, np.random.default_rng(6))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    rng = np.random.default_rng(7)
    expected = RandomHorizontalFlip(0.5)(RandomResizedCrop(24)(image, rng), rng)
    expected = RandAugment(1, 5, num_magnitude_bins=11, magnitude_std=0.0)(expected, rng)
    classification = ClassificationAugmentation(
        24, rand_augment_num_ops=1, rand_augment_magnitude=5, rand_augment_magnitude_std=0.0
    )
    np.testing.assert_array_equal(np.asarray(classification(image, np.random.default_rng(7))), np.asarray(expected))
    # They share their crop and flip settings, but one is not the other (the VQ-KD processor takes no RandAugment).
    assert not isinstance(classification, SingleViewAugmentation)


def test_processor_builds_its_augmentation_from_its_settings():
    processor = BeitV2ImageProcessor(
        image_size=48, patch_size=8, tokenizer_image_size=24, crop_scale=[0.5, 1.0], color_jitter=0.2
    )
    assert processor.training_augmentation() == TwoViewAugmentation(
        image_size=48, tokenizer_image_size=24, crop_scale=(0.5, 1.0), color_jitter=0.2
    )
    # Built from the current attributes, with per-augmentation overrides.
    processor.crop_ratio = [0.5, 2.0]
    assert processor.training_augmentation(color_jitter=0.0).crop_ratio == (0.5, 2.0)
    assert processor.training_augmentation(color_jitter=0.0).color_jitter == 0.0
    with pytest.raises(ValueError, match=r"Unknown augmentation setting.*mask_ratio"):
        processor.training_augmentation(mask_ratio=0.5)
    vqkd = VQKDImageProcessor(image_size=32, crop_scale=(0.4, 1.0), interpolation="bilinear")
    assert vqkd.training_augmentation() == SingleViewAugmentation(32, (0.4, 1.0), interpolation="bilinear")
    assert vqkd.training_augmentation(image_size=16).image_size == 16


def test_augmentations_are_plain_picklable_settings():
    for augmentation in (
        TwoViewAugmentation(),
        SingleViewAugmentation(),
        ClassificationAugmentation(),
        SegmentationAugmentation(),
    ):
        copy = pickle.loads(pickle.dumps(augmentation))
        assert copy == augmentation and repr(copy) == repr(augmentation)
        # Settings only: the operations built from them are neither arguments nor printed.
        settings = [field.name for field in dataclasses.fields(augmentation) if field.init]
        assert all(name in repr(augmentation) for name in settings) and "_crop" not in repr(augmentation)
        with pytest.raises(dataclasses.FrozenInstanceError):
            augmentation.flip_probability = 1.0
    image = texture()
    first, second = TwoViewAugmentation(64, 32), pickle.loads(pickle.dumps(TwoViewAugmentation(64, 32)))
    for a, b in zip(first(image, np.random.default_rng(1)), second(image, np.random.default_rng(1)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TwoViewAugmentation(image_size=0), "image_size"),
        (lambda: TwoViewAugmentation(crop_scale=(0.5, 0.2)), "scale"),
        (lambda: TwoViewAugmentation(crop_scale=(0.5,)), "crop_scale"),
        (lambda: TwoViewAugmentation(interpolation="cubic"), "interpolation"),
        (lambda: TwoViewAugmentation(color_jitter=-1), "brightness"),
        (lambda: SingleViewAugmentation(flip_probability=2), "p must be"),
        (lambda: ClassificationAugmentation(rand_augment_magnitude=11), "magnitude"),
        (lambda: SegmentationAugmentation(scale_range=(0, 2)), "scale_range"),
        (lambda: SegmentationAugmentation(flip_probability=-0.1), "flip_probability"),
    ],
)
def test_bad_augmentation_settings(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_segmentation_keeps_labels_aligned_and_pads_with_ignore_index():
    # Labels equal to the image's column index (< 256 columns): after any rescale, crop and flip, each label must
    # still sit on the pixel that carries the same column value, except where the crop reaches the padding.
    width, height = 30, 20
    xs = np.broadcast_to(np.arange(width), (height, width))
    image = PIL.Image.fromarray(np.stack([xs] * 3, -1).astype(np.uint8))
    augmentation = SegmentationAugmentation(crop_size=48, scale_range=(0.5, 1.0), interpolation="nearest")
    for seed in range(10):
        pixels, labels = augmentation(image, xs + 1000, np.random.default_rng(seed))
        assert pixels.size == (48, 48) and labels.shape == (48, 48) and labels.dtype == np.int64
        padded = labels == 255
        assert padded.any(), "an image scaled below the crop size is padded"
        np.testing.assert_array_equal(labels[~padded] - 1000, np.asarray(pixels)[..., 0][~padded])
        assert (np.asarray(pixels)[padded] == 0).all()
    with pytest.raises(ValueError, match="size of the image"):
        augmentation(image, xs[:, :10], np.random.default_rng(0))
    with pytest.raises(ValueError, match="integer class ids"):
        augmentation(image, xs.astype(np.float32), np.random.default_rng(0))
