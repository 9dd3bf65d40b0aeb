import math
import random

import numpy as np
import pytest
import torch

from processing import BlockwiseMaskGenerator, RandomMaskGenerator

NUM_DRAWS = 10_000


def reference_block_statistics(num_draws, height=14, width=14, target=75, min_patches=16, seed=0):
    """The reference algorithm (unilm beit2/masking_generator.py) restated with Python's `random`, which accepts
    reversed bounds in `uniform`; returns (blocks per draw, masked count before top-up, final masks)."""
    rnd = random.Random(seed)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    block_counts, block_areas, masks = [], [], []
    for _ in range(num_draws):
        mask = np.zeros((height, width), dtype=bool)
        count, blocks = 0, 0
        while count < target:
            remaining = min(target - count, target)
            added = 0
            for _ in range(10):
                area = rnd.uniform(min_patches, remaining)
                aspect = math.exp(rnd.uniform(*log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
                    new = h * w - mask[top : top + h, left : left + w].sum()
                    if 0 < new <= remaining:
                        mask[top : top + h, left : left + w] = True
                        added = new
                        break
            if added == 0:
                break
            count += added
            blocks += 1
        block_counts.append(blocks)
        block_areas.append(count)
        unmasked = np.flatnonzero(~mask)
        mask.flat[rnd.sample(list(unmasked), target - count)] = True
        masks.append(mask)
    return np.array(block_counts), np.array(block_areas), np.stack(masks)


@pytest.fixture(scope="module")
def reference_stats():
    return reference_block_statistics(NUM_DRAWS)


@pytest.fixture(scope="module")
def blockwise_draws():
    generator = BlockwiseMaskGenerator(num_masking_patches=75, min_num_patches=16)
    rng = np.random.default_rng(0)
    pre_masks, blocks, finals = [], [], []
    for _ in range(NUM_DRAWS):
        pre, block_list = generator._sample_blocks(rng)
        pre_masks.append(pre)
        blocks.append(block_list)
    finals = generator.generate(NUM_DRAWS, rng=np.random.default_rng(1))
    return np.stack(pre_masks), blocks, finals


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_masking_patches": 75}, 75),
        ({"mask_ratio": 0.4}, 78),
        ({"mask_ratio": 0.4, "num_masking_patches": 60}, 60),
        ({"input_size": (6, 10), "mask_ratio": 0.5, "min_num_patches": 4}, 30),
        ({"input_size": 4, "num_masking_patches": 15, "min_num_patches": 16, "max_num_patches": 20}, 15),
        ({"input_size": 2, "num_masking_patches": 1, "min_num_patches": 1}, 1),
        ({"input_size": 3, "mask_ratio": 0.4}, 4),
    ],
)
def test_blockwise_count_is_exact_over_many_draws(kwargs, expected):
    generator = BlockwiseMaskGenerator(seed=0, **kwargs)
    masks = generator.generate(NUM_DRAWS)
    assert masks.dtype == np.bool_
    assert masks.shape == (NUM_DRAWS, *generator.shape)
    assert (masks.sum(axis=(1, 2)) == expected).all()


def test_random_generator_count_shape_and_uniformity():
    generator = RandomMaskGenerator(input_size=(14, 14), mask_ratio=0.4, seed=0)
    masks = generator.generate(NUM_DRAWS)
    assert masks.shape == (NUM_DRAWS, 14, 14)
    assert (masks.sum(axis=(1, 2)) == 78).all()
    per_patch = masks.mean(axis=0)
    # 78/196 per patch; binomial std over 10k draws is ~0.005.
    assert np.abs(per_patch - 78 / 196).max() < 0.025
    assert generator().shape == (14, 14)


def test_blocks_are_rectangles_and_top_up_only_adds(blockwise_draws):
    pre_masks, blocks, _ = blockwise_draws
    generator = BlockwiseMaskGenerator(num_masking_patches=75, min_num_patches=16, seed=3)
    no_top_up = 0
    for pre, block_list in zip(pre_masks[:2000], blocks[:2000]):
        union = np.zeros_like(pre)
        for top, left, h, w in block_list:
            assert 0 < h < 14 and 0 < w < 14
            assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
            union[top : top + h, left : left + w] = True
        np.testing.assert_array_equal(union, pre)
        assert pre.sum() <= 75
        no_top_up += pre.sum() == 75
    # Most draws reach the target with blocks alone (about two thirds with the reference parameters).
    assert 0.55 < no_top_up / 2000 < 0.8
    # A mask that needed no top-up is exactly its blocks: check the full path with the same generator state.
    for draw in range(300):
        pre, _ = generator._sample_blocks(np.random.default_rng(draw))
        final = generator(np.random.default_rng(draw))
        assert final.sum() == 75
        assert (final >= pre).all()
        if pre.sum() == 75:
            np.testing.assert_array_equal(final, pre)


def test_border_rows_and_columns_masked_at_reference_rate(blockwise_draws, reference_stats):
    _, _, masks = blockwise_draws
    _, _, reference_masks = reference_stats
    average = masks.mean()
    for border in (masks[:, -1, :], masks[:, :, -1], masks[:, 0, :], masks[:, :, 0]):
        assert border.mean() > 0, "the border must be reachable"
        # Blocks reach the border less often than the centre: about a third of the average rate.
        assert 0.2 < border.mean() / average < 0.5
    for ours, theirs in ((masks[:, -1, :], reference_masks[:, -1, :]), (masks[:, :, -1], reference_masks[:, :, -1])):
        assert abs(ours.mean() - theirs.mean()) < 0.015
    # Per-cell rates match the reference everywhere (binomial std ~0.005 per cell).
    assert np.abs(masks.mean(axis=0) - reference_masks.mean(axis=0)).max() < 0.035


def test_block_count_and_area_distribution_match_reference(blockwise_draws, reference_stats):
    pre_masks, blocks, _ = blockwise_draws
    reference_counts, reference_areas, _ = reference_stats
    counts = np.array([len(b) for b in blocks])
    areas = pre_masks.sum(axis=(1, 2))
    assert abs(counts.mean() - reference_counts.mean()) < 0.08
    assert abs(areas.mean() - reference_areas.mean()) < 0.3
    # Same histogram of blocks per mask, within sampling noise.
    ours = np.bincount(counts, minlength=12)[:12] / len(counts)
    theirs = np.bincount(reference_counts, minlength=12)[:12] / len(reference_counts)
    assert np.abs(ours - theirs).max() < 0.025
    assert abs((areas == 75).mean() - (reference_areas == 75).mean()) < 0.025


def test_reversed_area_bounds_still_place_small_blocks():
    # After a first block, fewer than min_num_patches patches remain: the reference then draws the area between
    # the remainder and min_num_patches (reversed bounds) and can still place a smaller block.
    generator = BlockwiseMaskGenerator(num_masking_patches=20, min_num_patches=16, seed=0)
    rng = np.random.default_rng(0)
    second_block_areas = []
    for _ in range(2000):
        _, block_list = generator._sample_blocks(rng)
        second_block_areas += [h * w for _, _, h, w in block_list[1:]]
    assert second_block_areas, "no second block was ever placed"
    assert min(second_block_areas) < 16


def test_same_seed_same_masks_and_generator_input():
    first = BlockwiseMaskGenerator(seed=123).generate(50)
    second = BlockwiseMaskGenerator(seed=123).generate(50)
    other = BlockwiseMaskGenerator(seed=124).generate(50)
    np.testing.assert_array_equal(first, second)
    assert (first != other).any()
    from_generator = BlockwiseMaskGenerator(seed=np.random.default_rng(123)).generate(50)
    np.testing.assert_array_equal(first, from_generator)
    # An explicit rng at call time does not touch the generator's own stream.
    generator = BlockwiseMaskGenerator(seed=123)
    generator(np.random.default_rng(0))
    np.testing.assert_array_equal(generator.generate(50), first)


class _MaskDataset(torch.utils.data.Dataset):
    def __init__(self, generator):
        self.generator = generator

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.from_numpy(self.generator().reshape(-1))


def _loader_masks(seed, torch_seed, epochs=1):
    dataset = _MaskDataset(BlockwiseMaskGenerator(seed=seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    torch.manual_seed(torch_seed)
    return [torch.cat(list(loader)).numpy() for _ in range(epochs)]


def test_dataloader_workers_get_distinct_reproducible_streams():
    first_run = _loader_masks(seed=5, torch_seed=0, epochs=2)
    second_run = _loader_masks(seed=5, torch_seed=0, epochs=2)
    for a, b in zip(first_run, second_run):
        np.testing.assert_array_equal(a, b)
    epoch = first_run[0]
    # Batches 0, 2 come from worker 0 and batches 1, 3 from worker 1: their masks must differ.
    assert (epoch[0:2] != epoch[2:4]).any()
    assert len({row.tobytes() for row in epoch}) == len(epoch)
    # A new epoch gets new masks, and another seed gives other masks.
    assert (first_run[0] != first_run[1]).any()
    assert (_loader_masks(seed=6, torch_seed=0)[0] != epoch).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.2}, "mask_ratio"),
        ({"num_masking_patches": 0}, "at least 1"),
        ({"num_masking_patches": 196}, "below the number of patches"),
        ({"num_masking_patches": 50, "min_num_patches": 40, "max_num_patches": 30}, "min_num_patches"),
        ({"min_aspect": 0.0}, "positive"),
        ({"min_aspect": -1.0}, "positive"),
        ({"max_aspect": -2.0}, "positive"),
        ({"input_size": (0, 14)}, "input_size"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_blockwise_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockwiseMaskGenerator(**kwargs)


@pytest.mark.parametrize("kwargs", [{"mask_ratio": 1.5}, {"num_masking_patches": 200}, {"num_masking_patches": 0}])
def test_random_generator_errors(kwargs):
    with pytest.raises(ValueError):
        RandomMaskGenerator(**kwargs)


def test_generate_rejects_empty_batch():
    with pytest.raises(ValueError, match="batch_size"):
        BlockwiseMaskGenerator().generate(0)
