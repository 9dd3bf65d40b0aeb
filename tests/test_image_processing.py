import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from processing import (
    BeitV2ImageProcessor,
    DataCollatorForMaskedImageModeling,
    VQKDImageProcessor,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def tiny_processor(**kwargs):
    settings = {"image_size": 32, "patch_size": 8, "tokenizer_image_size": 32, "min_num_patches": 2}
    settings.update(kwargs)
    return BeitV2ImageProcessor(**settings)


def coordinate_image(width=120, height=90):
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return PIL.Image.fromarray(np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8))


def smooth_image(width=80, height=60):
    xs, ys = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return PIL.Image.fromarray((np.stack([xs, ys, (xs + ys) / 2], axis=-1) * 255).astype(np.uint8))


def test_vqkd_eval_gives_plain_pixels_and_matches_resize_center_crop():
    processor = VQKDImageProcessor(image_size=32)
    gray = PIL.Image.new("RGB", (50, 40), (128, 128, 128))
    out = processor(gray, return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    # Plain [0, 1] pixels: VQKDModel maps them to its encoder's [-1, 1] itself.
    np.testing.assert_allclose(out, 128 / 255, atol=1e-6)
    np.testing.assert_allclose(
        processor(gray, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)["pixel_values"][0],
        (128 / 255 - 0.5) / 0.5,
        atol=1e-6,
    )
    # The reference's validation transform: shorter side to int(32 / (224/256)) = 36, then the central 32 px
    # (written here with PIL directly).
    image = smooth_image(80, 60)
    resized = image.resize((48, 36), PIL.Image.BICUBIC)
    reference = np.asarray(resized.crop((8, 2, 40, 34)), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(processor(image)["pixel_values"][0], reference, atol=1e-6)
    # crop_pct 1.0 (and the reference's rule from 384 px): the central square of the shorter-side resize.
    whole = np.asarray(image.resize((42, 32), PIL.Image.BICUBIC).crop((5, 0, 37, 32)), np.float32)
    np.testing.assert_allclose(
        processor(image, crop_pct=1.0)["pixel_values"][0], whole.transpose(2, 0, 1) / 255, atol=1e-6
    )
    with pytest.raises(ValueError, match="crop_pct"):
        VQKDImageProcessor(crop_pct=1.5)


def test_vqkd_training_augmentation_draws_from_the_given_generator():
    image = smooth_image()
    processor = VQKDImageProcessor(image_size=32)
    augmentation = processor.training_augmentation()

    def augmented(rng):
        return processor.pretraining_inputs(image, augmentation=augmentation, rng=rng)["pixel_values"][0]

    first, again = augmented(np.random.default_rng(1)), augmented(np.random.default_rng(1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, augmented(np.random.default_rng(2)))
    # An int is a seed.
    np.testing.assert_array_equal(augmented(1), first)
    with pytest.raises(ValueError, match="rng must be"):
        augmented("seed")
    # The generator is required: a default seed would give every call the same crop.
    with pytest.raises(TypeError, match="rng"):
        processor.pretraining_inputs(image, augmentation=augmentation)
    # Without augmentation, the training view is the evaluation view.
    np.testing.assert_array_equal(
        processor.pretraining_inputs(image, rng=0)["pixel_values"][0], processor(image)["pixel_values"][0]
    )


def test_beitv2_outputs_shapes_types_and_normalisation():
    processor = tiny_processor()
    value = 200
    image = PIL.Image.new("RGB", (40, 30), (value,) * 3)
    listed = processor.pretraining_inputs([image, image], rng=0)
    assert isinstance(listed["pixel_values"], list) and len(listed["pixel_values"]) == 2
    batch = processor.pretraining_inputs([image, image], rng=0, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["tokenizer_pixel_values"].shape == (2, 3, 32, 32)
    assert batch["bool_masked_pos"].shape == (2, 16) and batch["bool_masked_pos"].dtype == torch.bool
    assert (batch["bool_masked_pos"].sum(-1) == round(0.4 * 16)).all()
    expected = (value / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(batch["pixel_values"][0, :, 5, 5].numpy(), expected, atol=1e-5)
    # The tokenizer view is plain [0, 1] pixels, whatever the backbone normalisation.
    np.testing.assert_allclose(batch["tokenizer_pixel_values"].numpy(), value / 255, atol=1e-6)
    assert processor.num_patches == 16


def test_beit_v1_preset_dalle_view():
    processor = BeitV2ImageProcessor.for_beit_v1(num_masking_patches=75)
    value = 51
    out = processor.pretraining_inputs(PIL.Image.new("RGB", (300, 250), (value,) * 3), rng=0, return_tensors="np")
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert out["tokenizer_pixel_values"].shape == (1, 3, 112, 112)
    np.testing.assert_allclose(out["pixel_values"], (value / 255 - 0.5) / 0.5, atol=1e-5)
    # Plain [0, 1] pixels: DVAEModel applies DALL-E's map_pixels itself.
    np.testing.assert_allclose(out["tokenizer_pixel_values"], value / 255, atol=1e-6)
    assert out["bool_masked_pos"].shape == (1, 196) and out["bool_masked_pos"].sum() == 75
    assert processor.tokenizer_interpolation == "lanczos"


def _x_range(view):
    return int(view[..., 0].min()), int(view[..., 0].max()), int(view[..., 1].min()), int(view[..., 1].max())


def test_training_views_share_one_crop_box():
    processor = tiny_processor(
        image_size=64,
        tokenizer_image_size=16,
        interpolation="nearest",
        tokenizer_interpolation="nearest",
        color_jitter=0.0,
        image_mean=(0, 0, 0),
        image_std=(1, 1, 1),
    )
    image = coordinate_image()
    augmentation, rng = processor.training_augmentation(), np.random.default_rng(0)
    boxes = set()
    for _ in range(20):
        out = processor.pretraining_inputs(image, augmentation=augmentation, rng=rng, return_tensors="np")
        view = np.rint(out["pixel_values"][0].transpose(1, 2, 0) * 255)
        tokenizer_view = np.rint(out["tokenizer_pixel_values"][0].transpose(1, 2, 0) * 255)
        first, second = _x_range(view), _x_range(tokenizer_view)
        # The coarser view samples fewer pixels of the same box: its extremes lie within one of its pixels.
        box_width, box_height = first[1] - first[0] + 1, first[3] - first[2] + 1
        assert abs(first[0] - second[0]) <= box_width / 16 + 1 and abs(first[1] - second[1]) <= box_width / 16 + 1
        assert abs(first[2] - second[2]) <= box_height / 16 + 1 and abs(first[3] - second[3]) <= box_height / 16 + 1
        boxes.add(first)
    assert len(boxes) > 10, "the crop box must change between calls"


def test_eval_mode_is_deterministic_center_crop():
    processor = tiny_processor(interpolation="nearest", image_mean=(0, 0, 0), image_std=(1, 1, 1))
    image = coordinate_image(120, 90)
    first = processor(image)["pixel_values"][0]
    np.testing.assert_array_equal(first, processor(image)["pixel_values"][0])
    x_min, x_max, y_min, y_max = _x_range(np.rint(first.transpose(1, 2, 0) * 255))
    assert 15 <= x_min <= 17 and 102 <= x_max <= 104 and 0 <= y_min <= 2 and 87 <= y_max <= 89


@pytest.mark.parametrize(
    "image",
    [
        PIL.Image.new("L", (40, 30), 100),
        PIL.Image.new("LA", (40, 30), (100, 255)),
        PIL.Image.new("P", (40, 30), 3),
        PIL.Image.new("RGBA", (40, 30), (1, 2, 3, 128)),
        PIL.Image.new("CMYK", (40, 30), (10, 20, 30, 40)),
        PIL.Image.new("I;16", (40, 30), 30000),
        PIL.Image.new("I", (40, 30), 30000),
        PIL.Image.new("F", (40, 30), 0.3),
        PIL.Image.new("RGB", (7, 5), (9, 9, 9)),
        np.zeros((30, 40, 3), dtype=np.uint8),
        np.full((3, 30, 40), 0.5, dtype=np.float32),
        np.zeros((30, 40), dtype=np.uint8),
        torch.rand(3, 30, 40),
    ],
    ids=["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "smaller-than-crop", "hwc", "chw-float", "2d", "torch"],
)
@pytest.mark.parametrize("augment", [False, True])
def test_every_input_kind_and_mode(image, augment):
    processor = tiny_processor()
    augmentation = processor.training_augmentation() if augment else None
    out = processor.pretraining_inputs(image, augmentation=augmentation, rng=0, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()
    assert out["tokenizer_pixel_values"].min() >= 0 and out["tokenizer_pixel_values"].max() <= 1
    if not augment:
        # The evaluation view of the call is the pretraining inputs' backbone view.
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], out["pixel_values"])


def test_batched_array_input():
    out = tiny_processor()(np.zeros((3, 20, 30, 3), dtype=np.uint8), return_tensors="np")
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    out = tiny_processor().pretraining_inputs(np.zeros((3, 20, 30, 3), dtype=np.uint8), rng=0, return_tensors="np")
    assert out["bool_masked_pos"].shape == (3, 16)


def test_random_mask_type_and_errors():
    processor = tiny_processor(mask_type="random", mask_ratio=0.5)
    assert processor.pretraining_inputs(smooth_image(), rng=0)["bool_masked_pos"][0].sum() == 8
    with pytest.raises(ValueError, match="mask_type"):
        tiny_processor(mask_type="grid")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_processor(image_size=30)
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_processor(mask_ratio=1.2)


def test_changed_attributes_and_per_call_settings_take_effect():
    image = smooth_image()
    processor = tiny_processor(mask_type="random", mask_ratio=0.25)

    def masked(**settings):
        return processor.pretraining_inputs(image, rng=0, **settings)["bool_masked_pos"][0]

    assert masked().sum() == 4
    # A per-call setting applies to that call only; an attribute change to every later call.
    assert masked(mask_ratio=0.5, image_size=64).shape == (64,)
    assert masked(mask_ratio=0.5).sum() == 8
    assert masked().sum() == 4
    assert processor(image, image_size=16, return_tensors="np")["pixel_values"].shape == (1, 3, 16, 16)
    processor.image_size, processor.mask_ratio = 64, 0.5
    features = processor.pretraining_inputs(image, rng=0, return_tensors="np")
    assert features["pixel_values"].shape == (1, 3, 64, 64) and features["bool_masked_pos"].sum() == 32
    assert processor(image, return_tensors="np")["pixel_values"].shape == (1, 3, 64, 64)
    assert processor.num_patches == 64 and processor.mask_generator.num_masking_patches == 32
    processor.image_mean = processor.image_std = [0.5, 0.5, 0.5]
    pixels = processor(image, return_tensors="np")["pixel_values"]
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.9
    # The backbone normalisation never reaches the tokenizer view: it stays plain [0, 1].
    tokenizer_pixels = processor.pretraining_inputs(image, rng=0, return_tensors="np")["tokenizer_pixel_values"]
    assert tokenizer_pixels.min() >= 0 and tokenizer_pixels.max() <= 1 and tokenizer_pixels.min() < 0.05
    # Bad values fail at the next call with the constructor's messages; unknown names are rejected.
    processor.mask_type = "grid"
    with pytest.raises(ValueError, match="mask_type"):
        masked()
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['mask_ratios'\] for BeitV2ImageProcessor"):
        tiny_processor().pretraining_inputs(image, rng=0, mask_ratios=0.5)
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['extra_argument'\] for .*preprocess"):
        tiny_processor()(image, extra_argument=True)
    # Training-only settings belong to the augmentation: per call they would do nothing, so they are refused.
    with pytest.raises(ValueError, match=r"\['color_jitter', 'crop_scale'\].*training_augmentation\(crop_scale"):
        tiny_processor().pretraining_inputs(image, rng=0, crop_scale=(0.5, 1.0), color_jitter=0.1)

    vqkd = VQKDImageProcessor(image_size=32)
    assert vqkd(image, image_size=16, return_tensors="np")["pixel_values"].shape == (1, 3, 16, 16)
    assert vqkd(image, return_tensors="np")["pixel_values"].shape == (1, 3, 32, 32)
    vqkd.image_size = 48
    augmentation = vqkd.training_augmentation()
    augmented = vqkd.pretraining_inputs(image, augmentation=augmentation, rng=0, return_tensors="np")
    assert augmented["pixel_values"].shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"\['crop_ratio'\].*training_augmentation"):
        vqkd(image, crop_ratio=(1.0, 1.0))
    # An augmentation built for other sizes than the call's would misalign views and masks: refused.
    with pytest.raises(ValueError, match="view is 48x48, but the processor's image_size is 16"):
        vqkd.pretraining_inputs(image, augmentation=augmentation, rng=0, image_size=16)
    processor = tiny_processor()
    smaller_tokenizer_view = processor.training_augmentation(tokenizer_image_size=16)
    with pytest.raises(ValueError, match="tokenizer view is 16x16, but the processor's tokenizer size is 32"):
        processor.pretraining_inputs(image, augmentation=smaller_tokenizer_view, rng=0)
    with pytest.raises(ValueError, match="must return two views"):
        processor.pretraining_inputs(image, augmentation=vqkd.training_augmentation(image_size=32), rng=0)


@pytest.mark.parametrize("processor_class", [BeitV2ImageProcessor, VQKDImageProcessor])
def test_calling_the_processor_gives_only_the_evaluation_view(processor_class):
    # How pipelines, the Hub widget and AutoImageProcessor users call a saved processor: images only. They must get
    # the deterministic evaluation view and nothing else (a mask would be applied by the model, silently).
    processor = processor_class(image_size=32, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    image = smooth_image(80, 60)
    assert set(processor(image)) == {"pixel_values"}
    assert set(processor(images=image, return_tensors="pt")) == {"pixel_values"}
    # The evaluation transform, written here with PIL directly: BEiT v2 takes the central square (one resampling),
    # VQ-KD resizes the shorter side to int(32 / (224/256)) = 36 and crops the central 32 px.
    if processor_class is BeitV2ImageProcessor:
        view = image.crop((10, 0, 70, 60)).resize((32, 32), PIL.Image.BICUBIC)
    else:
        view = image.resize((48, 36), PIL.Image.BICUBIC).crop((8, 2, 40, 34))
    expected = (np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.25
    first = processor([image, image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(first[0], expected, atol=1e-5)
    # Deterministic: the same call again, and another instance of the same settings, give the same pixels.
    np.testing.assert_array_equal(first, processor([image, image], return_tensors="np")["pixel_values"])
    other = processor_class.from_dict(processor.to_dict())
    np.testing.assert_array_equal(first, other([image, image], return_tensors="np")["pixel_values"])
    # Random views and masks are asked for by name; passed to the evaluation call they are refused, saying where
    # they go.
    for argument in ("augmentation", "rng"):
        with pytest.raises(ValueError, match="pretraining_inputs"):
            processor(image, **{argument: None})
    if processor_class is BeitV2ImageProcessor:
        with pytest.raises(ValueError, match="pretraining_inputs"):
            processor(image, mask_ratio=0.5)


def test_image_feature_extraction_pipeline_on_a_pretraining_folder_sees_the_whole_image(tmp_path):
    # The bug this guards against: `pipeline("image-feature-extraction", model=<a run_mim.py output folder>)` fed the
    # saved processor's mask to the model, which replaced the masked patches by the mask token. The folder holds what
    # run_mim.py saves (the MIM model, its processor); the pipeline's features must equal the plain forward of the
    # evaluation view.
    from transformers import pipeline

    from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

    torch.manual_seed(0)
    config = BeitV2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        early_layers=1,
        vocab_size=16,
    )
    BeitV2ForMaskedImageModeling(config).save_pretrained(tmp_path)
    processor = tiny_processor(num_masking_patches=6)
    processor.save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), trust_remote_code=True, device="cpu")
    image = smooth_image()
    features = extractor(image, return_tensors=True)[0]
    with torch.no_grad():
        expected = extractor.model(**processor(image, return_tensors="pt")).last_hidden_state[0]
        masked = processor.pretraining_inputs(image, rng=0, return_tensors="pt")
        masked_features = extractor.model(masked["pixel_values"], bool_masked_pos=masked["bool_masked_pos"])
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, masked_features.last_hidden_state[0], atol=1e-3)


def test_rgb_conversion_and_channel_layout_arguments():
    rgba = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    for processor in (tiny_processor(), VQKDImageProcessor(image_size=32)):
        # By default every image becomes RGB (alpha composited over white), as the models expect.
        assert processor(rgba, return_tensors="np")["pixel_values"].shape == (1, 3, 32, 32)
        # do_convert_rgb=False keeps the image's channels; the normalisation then needs one value per channel.
        kept = processor(rgba, do_convert_rgb=False, image_mean=[0.0] * 4, image_std=[1.0] * 4, return_tensors="np")
        assert kept["pixel_values"].shape == (1, 4, 32, 32)
        # Each channel is resampled as the RGB channels are: the first three equal those of the RGB image.
        rgb = processor(rgba[..., :3], image_mean=[0.0] * 3, image_std=[1.0] * 3, return_tensors="np")
        np.testing.assert_array_equal(kept["pixel_values"][:, :3], rgb["pixel_values"])
        with pytest.raises(ValueError, match="image_mean has 3 values but the images have 4 channels"):
            processor(rgba, do_convert_rgb=False)
        # input_data_format says where the channels are; channels-first and channels-last give the same pixels.
        first = processor(rgba.transpose(2, 0, 1), input_data_format="channels_first", return_tensors="np")
        last = processor(rgba, input_data_format="channels_last", return_tensors="np")
        np.testing.assert_array_equal(first["pixel_values"], last["pixel_values"])
        # A 4-row image whose channels come last would be read as channels-first without the argument.
        tall = np.zeros((4, 40, 3), dtype=np.uint8)
        assert processor(tall, input_data_format="channels_last", return_tensors="np")["pixel_values"].shape[1] == 3
        with pytest.raises(ValueError, match="input_data_format must be one of"):
            processor(rgba, input_data_format="channels_middle")
    assert VQKDImageProcessor.from_dict({}, do_convert_rgb=False).do_convert_rgb is False


def test_mutable_settings_are_not_shared_between_instances():
    # What transformers' test_override_instance_attributes_does_not_affect_other_instances checks for processors with
    # a `size` dict (ours have an int `image_size`): changing one instance's lists leaves the others alone.
    for processor_class in (BeitV2ImageProcessor, VQKDImageProcessor):
        first, second = processor_class(), processor_class()
        first.image_mean[0], first.crop_scale[0] = -1.0, 0.5
        assert second.image_mean[0] != -1.0 and second.crop_scale[0] != 0.5
        assert processor_class().image_mean[0] != -1.0


def test_pretraining_inputs_draw_only_from_the_call_generator():
    images = [smooth_image(), coordinate_image()] * 2
    processor = tiny_processor()
    augmentation = processor.training_augmentation()
    # The output is a function of the generator's state; the images of a batch draw one after the other.
    first = processor.pretraining_inputs(images, augmentation=augmentation, rng=np.random.default_rng(3))
    again = processor.pretraining_inputs(images, augmentation=augmentation, rng=np.random.default_rng(3))
    other = processor.pretraining_inputs(images, augmentation=augmentation, rng=np.random.default_rng(4))
    assert list(first) == processor.pretraining_input_names
    for name in first:
        np.testing.assert_array_equal(np.stack(first[name]), np.stack(again[name]))
        assert not np.array_equal(np.stack(first[name]), np.stack(other[name]))
    assert not np.array_equal(first["bool_masked_pos"][0], first["bool_masked_pos"][2])
    assert not any(name.startswith("_") for name in vars(processor)), "no runtime state on the processor"


# Every setting a saved config holds, once (settings left at None are not written).
SAVED_SETTINGS = {
    BeitV2ImageProcessor: {
        "image_size", "patch_size", "interpolation", "image_mean", "image_std", "tokenizer_image_size",
        "tokenizer_interpolation", "mask_type", "mask_ratio", "min_num_patches", "min_aspect", "crop_scale",
        "crop_ratio", "color_jitter", "do_convert_rgb",
    },
    VQKDImageProcessor: {
        "image_size", "interpolation", "image_mean", "image_std", "crop_scale", "crop_ratio", "do_convert_rgb",
    },
}  # fmt: skip


@pytest.mark.parametrize("processor_class", [BeitV2ImageProcessor, VQKDImageProcessor])
def test_save_and_load_round_trip(tmp_path, processor_class):
    processor = processor_class(image_size=48)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == processor_class.__name__
    assert saved["auto_map"]["AutoImageProcessor"].endswith(processor_class.__name__)
    assert set(saved) - {"image_processor_type", "auto_map"} == SAVED_SETTINGS[processor_class]
    # The processor module and every module it imports are copied for Hub custom code.
    copied = {path.name for path in tmp_path.glob("*.py")}
    assert {"transforms.py", "augmentation.py", "rand_augment.py", "processor_settings.py"} <= copied
    for loaded in (processor_class.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is processor_class
        assert loaded.to_dict() == processor.to_dict()
        assert loaded.training_augmentation() == processor.training_augmentation()
    assert processor_class.from_pretrained(tmp_path, image_size=64).image_size == 64
    image = smooth_image()
    np.testing.assert_array_equal(
        processor(image)["pixel_values"][0], processor_class.from_pretrained(tmp_path)(image)["pixel_values"][0]
    )


def test_v1_preset_round_trip(tmp_path):
    processor = BeitV2ImageProcessor.for_beit_v1()
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.tokenizer_image_size == 112 and loaded.tokenizer_interpolation == "lanczos"


def test_custom_code_loads_in_fresh_process_without_the_package(tmp_path):
    saved = tmp_path / "saved"
    tiny_processor(mask_ratio=0.5).save_pretrained(saved)
    hub_copy = tmp_path / "hub_copy"
    shutil.copytree(saved, hub_copy)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["processing"] = None  # the installed package must not be importable
        sys.modules["modeling_beitv2"] = None
        import json
        import numpy as np
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(hub_copy)!r}, trust_remote_code=True)
        image, rng = np.zeros((20, 30, 3), dtype=np.uint8), np.random.default_rng(0)
        out = processor.pretraining_inputs(
            image, augmentation=processor.training_augmentation(), rng=rng, return_tensors="pt"
        )
        shape, masked = list(out["pixel_values"].shape), int(out["bool_masked_pos"].sum())
        plain = sorted(processor(image, return_tensors="pt"))
        print(json.dumps({{"module": type(processor).__module__, "shape": shape, "masked": masked, "plain": plain}}))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["shape"] == [1, 3, 32, 32] and report["masked"] == 8 and report["plain"] == ["pixel_values"]


class _ImageDataset(torch.utils.data.Dataset):
    """Each example draws from its own generator, derived from a seed and its index (as the scripts' streams do),
    so the examples do not depend on which worker makes them."""

    def __init__(self, processor, seed):
        self.processor, self.seed = processor, seed
        self.augmentation = processor.training_augmentation()
        self.image = smooth_image()

    def __len__(self):
        return 8

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        out = self.processor.pretraining_inputs(self.image, augmentation=self.augmentation, rng=rng)
        return {name: values[0] for name, values in out.items()}


def test_per_example_use_in_dataloader_workers_with_collator():
    def run():
        loader = torch.utils.data.DataLoader(
            _ImageDataset(tiny_processor(), seed=11),
            batch_size=2,
            num_workers=2,
            collate_fn=DataCollatorForMaskedImageModeling(),
            multiprocessing_context="fork",
        )
        torch.manual_seed(0)
        return list(loader)

    first, second = run(), run()
    assert first[0]["pixel_values"].shape == (2, 3, 32, 32) and first[0]["bool_masked_pos"].shape == (2, 16)
    for a, b in zip(first, second):
        for name in a:
            assert torch.equal(a[name], b[name])
    # Workers 0 and 1 (batches 0 and 1) must not replay the same stream.
    assert not torch.equal(first[0]["bool_masked_pos"], first[1]["bool_masked_pos"])
    assert not torch.equal(first[0]["pixel_values"], first[1]["pixel_values"])


def test_datasets_with_transform_and_map():
    datasets = pytest.importorskip("datasets")
    images = [smooth_image(40 + i, 30) for i in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    processor = tiny_processor()
    augmentation, rng = processor.training_augmentation(), np.random.default_rng(0)
    transformed = dataset.with_transform(
        lambda batch: processor.pretraining_inputs(batch["image"], augmentation=augmentation, rng=rng)
    )
    example = transformed[0]
    assert example["pixel_values"].shape == (3, 32, 32) and example["bool_masked_pos"].shape == (16,)
    batch = DataCollatorForMaskedImageModeling()([transformed[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["bool_masked_pos"].sum() == 4 * 6
    mapped = dataset.map(
        lambda batch: dict(processor.pretraining_inputs(batch["image"], rng=rng)),
        batched=True,
        remove_columns=["image"],
    )
    mapped.set_format("torch")
    assert mapped[0]["bool_masked_pos"].dtype == torch.bool and mapped[0]["pixel_values"].shape == (3, 32, 32)
