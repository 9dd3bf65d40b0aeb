import numpy as np
import PIL.Image
import pytest
import torch

from processing import DataCollatorForMaskedImageModeling, MixupCutmixCollator


def mim_example(seed, with_label=False):
    rng = np.random.default_rng(seed)
    example = {
        "pixel_values": rng.standard_normal((3, 8, 8)).astype(np.float32),
        "tokenizer_pixel_values": rng.uniform(0, 1, (3, 4, 4)).astype(np.float32),
        "bool_masked_pos": rng.random(4) < 0.5,
    }
    if with_label:
        example["labels"] = seed
    return example


def test_mim_collator_stacks_with_dtypes():
    examples = [mim_example(seed, with_label=True) for seed in range(3)]
    batch = DataCollatorForMaskedImageModeling()(examples)
    assert set(batch) == {"pixel_values", "tokenizer_pixel_values", "bool_masked_pos", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["tokenizer_pixel_values"].shape == (3, 3, 4, 4)
    assert batch["bool_masked_pos"].shape == (3, 4) and batch["bool_masked_pos"].dtype == torch.bool
    assert batch["labels"].tolist() == [0, 1, 2] and batch["labels"].dtype == torch.long
    np.testing.assert_array_equal(batch["pixel_values"][1].numpy(), examples[1]["pixel_values"])
    # Tensors (e.g. from `datasets` with torch formatting) stack the same way; absent fields stay absent.
    tensors = [{"pixel_values": torch.from_numpy(e["pixel_values"])} for e in examples]
    assert set(DataCollatorForMaskedImageModeling()(tensors)) == {"pixel_values"}


def test_mim_collator_keeps_other_fields_and_strings():
    # The scripts' data loaders may add fields (an `example_id` string to audit what a rank reads, counters):
    # strings stay a list, numbers and arrays stack with their own dtype.
    examples = [
        {**mim_example(seed), "example_id": f"image-{seed}", "index": np.int64(seed), "draw": 0.5 * seed}
        for seed in range(3)
    ]
    batch = DataCollatorForMaskedImageModeling()(examples)
    assert batch["example_id"] == ["image-0", "image-1", "image-2"]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2]
    assert batch["draw"].dtype == torch.float64 and batch["draw"].tolist() == [0.0, 0.5, 1.0]
    assert batch["bool_masked_pos"].dtype == torch.bool


@pytest.mark.parametrize(
    "examples, message",
    [
        ([], "empty"),
        ([mim_example(0), {"pixel_values": np.zeros((3, 8, 8))}], "same fields"),
        ([mim_example(0), {**mim_example(1), "pixel_values": np.zeros((3, 4, 4))}], "same shape"),
        ([{"pixel_values": np.zeros((1, 3, 8, 8))}], "3 dimensions"),
        ([{"bool_masked_pos": np.zeros((1, 16), dtype=bool)}], "1 dimensions"),
    ],
)
def test_mim_collator_errors(examples, message):
    with pytest.raises(ValueError, match=message):
        DataCollatorForMaskedImageModeling()(examples)


def classification_batch(batch_size=6, size=16, num_classes=5):
    rng = np.random.default_rng(0)
    return [
        {"pixel_values": rng.standard_normal((3, size, size)).astype(np.float32), "labels": i % num_classes}
        for i in range(batch_size)
    ]


def test_label_smoothing_without_mixing():
    collator = MixupCutmixCollator(num_classes=5, prob=0.0, label_smoothing=0.1, seed=0)
    examples = classification_batch()
    batch = collator(examples)
    np.testing.assert_array_equal(batch["pixel_values"][2].numpy(), examples[2]["pixel_values"])
    labels = batch["labels"]
    assert labels.shape == (6, 5)
    assert torch.allclose(labels[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))


def test_mixup_blends_images_and_labels_with_the_same_lambda():
    collator = MixupCutmixCollator(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, seed=1)
    examples = classification_batch()
    stacked = torch.stack([torch.from_numpy(e["pixel_values"]) for e in examples])
    lams = []
    for _ in range(300):
        batch = collator(examples)
        lam = batch["labels"][1, 1].item()  # example 1 (class 1) is mixed with example 4 (class 4)
        assert torch.allclose(batch["pixel_values"], stacked * lam + stacked.flip(0) * (1 - lam), atol=1e-5)
        assert torch.allclose(batch["labels"].sum(-1), torch.ones(6))
        lams.append(lam)
    assert 0.45 < np.mean(lams) < 0.55  # Beta(0.8, 0.8) is symmetric around 0.5
    assert min(lams) < 0.1 and max(lams) > 0.9


def test_cutmix_pastes_a_box_and_sets_lambda_to_its_area():
    collator = MixupCutmixCollator(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, seed=2)
    examples = classification_batch()
    stacked = torch.stack([torch.from_numpy(e["pixel_values"]) for e in examples])
    for _ in range(100):
        batch = collator(examples)
        pasted = (batch["pixel_values"][1] != stacked[1]).any(0)
        assert (batch["pixel_values"][1][:, pasted] == stacked[4][:, pasted]).all()
        if pasted.any():
            rows, cols = torch.nonzero(pasted, as_tuple=True)
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all(), "the pasted region must be a rectangle"
        lam = batch["labels"][1, 1].item()
        assert abs((1 - lam) - pasted.float().mean().item()) < 1e-6


def test_switch_between_mixup_and_cutmix():
    collator = MixupCutmixCollator(num_classes=5, label_smoothing=0.0, switch_prob=0.5, seed=3)
    examples = classification_batch()
    stacked = torch.stack([torch.from_numpy(e["pixel_values"]) for e in examples])
    cutmix = 0
    for _ in range(400):
        batch = collator(examples)
        unchanged = (batch["pixel_values"][1] == stacked[1]).all(0).float().mean().item()
        cutmix += unchanged > 0.3  # cutmix leaves most pixels untouched; mixup changes them all
    assert 150 < cutmix < 250


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 5, "mixup_alpha": -1.0}, "Alphas"),
        ({"num_classes": 5, "label_smoothing": 1.5}, "label_smoothing"),
        ({"num_classes": 5, "prob": -0.1}, "prob"),
    ],
)
def test_mixup_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixupCutmixCollator(**kwargs)


def test_mixup_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels"):
        MixupCutmixCollator(num_classes=3)(classification_batch(num_classes=5))


def test_pretraining_data_loader_collates_with_the_mim_collator(tmp_path):
    pytest.importorskip("datasets")
    from pretraining.data import ImageStream, build_dataloader, image_transform, load_image_stream
    from processing import BeitV2ImageProcessor

    for index in range(4):
        PIL.Image.new("RGB", (40, 30), (index, 60, 90)).save(tmp_path / f"{index}.png")
    dataset, column = load_image_stream(train_dir=str(tmp_path))
    processor = BeitV2ImageProcessor(image_size=32, patch_size=8, tokenizer_image_size=16, min_num_patches=2)
    transform = image_transform(processor, augment=True)

    stream = ImageStream(dataset, column, transform, seed=0, with_ids=True)
    loader = build_dataloader(stream, batch_size=2)
    # The scripts' loaders batch with the one MIM collator (which keeps the audit ids as strings).
    assert isinstance(loader.collate_fn, DataCollatorForMaskedImageModeling)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["tokenizer_pixel_values"].shape == (2, 3, 16, 16)
    assert batch["bool_masked_pos"].shape == (2, 16) and batch["bool_masked_pos"].dtype == torch.bool
    assert len(batch["example_id"]) == 2 and all(isinstance(name, str) for name in batch["example_id"])

    def custom(examples):
        return {"count": len(examples)}

    assert build_dataloader(stream, batch_size=2, collate_fn=custom).collate_fn is custom
