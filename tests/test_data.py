"""The shared data path of the pretraining scripts: examples/pretraining/data.py."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pytest
import torch
from conftest import image_table, png_bytes, write_parquet_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from pretraining.checkpoints import read_state, write_state  # noqa: E402
from pretraining.data import (  # noqa: E402
    ImageStream,
    build_dataloader,
    decode_image,
    decode_or_skip,
    example_id,
    image_counts,
    load_image_stream,
    new_decode_counts,
    resume_dataloader,
    split_off_validation,
)


def write_image_folder(root: Path, indices: range, fmt: str = "PNG") -> None:
    """One image per index (pixel value = index), two class sub-folders, and files an image folder must ignore."""
    for index in indices:
        folder = root / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (6, 5), (index, index, index)).save(folder / f"{index:03d}.{fmt.lower()}", format=fmt)
    (root / "labels.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(png_bytes(255))


def pixel_index(image: PIL.Image.Image, rng: np.random.Generator) -> dict:
    """A transform that keeps the image's identity (its pixel value) and one draw from the example's generator."""
    return {"index": np.asarray(image)[0, 0, 0].astype(np.int64), "draw": rng.random()}


def pixel_and_worker(image: PIL.Image.Image, rng: np.random.Generator) -> dict:
    """`pixel_index` plus the DataLoader worker that produced the example (-1 in the main process)."""
    worker = torch.utils.data.get_worker_info()
    return {**pixel_index(image, rng), "worker": worker.id if worker is not None else -1}


def read(stream: ImageStream, count: int) -> list[dict]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def take_batches(loader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_decode_image_converts_odd_modes_and_rejects_bad_bytes():
    for mode in ("L", "LA", "RGBA", "P", "I;16", "CMYK"):
        buffer = io.BytesIO()
        PIL.Image.new(mode, (4, 3)).save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        image, status = decode_image({"bytes": buffer.getvalue(), "path": None})
        assert image.mode == "RGB" and image.size == (4, 3) and status == "converted", mode
    image, status = decode_image({"bytes": png_bytes(7), "path": None})
    assert status == "ok" and np.asarray(image)[0, 0, 0] == 7
    transparent = PIL.Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, format="PNG")
    image, _ = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert np.asarray(image).min() == 255  # invisible pixels go on white
    image, status = decode_image({"bytes": png_bytes(3)[:25], "path": None})
    assert image is None and status.startswith("unreadable")
    assert decode_image(None) == (None, "missing")
    assert example_id({"bytes": b"abc", "path": "x"}) != example_id({"bytes": b"abd", "path": "x"})


def test_decode_or_skip_logs_each_bad_image_once_and_counts(caplog):
    counts = new_decode_counts()
    gray = {"bytes": png_bytes(5, mode="L"), "path": "gray.png"}
    with caplog.at_level("WARNING", logger="pretraining.data"):
        assert decode_or_skip({"bytes": png_bytes(7), "path": "ok.png"}, counts).mode == "RGB"
        assert decode_or_skip(gray, counts).mode == "RGB"
        assert decode_or_skip(gray, counts, convert=False).mode == "L"  # kept in its own mode, not counted
        assert decode_or_skip({"bytes": png_bytes(3)[:25], "path": "cut.png"}, counts) is None
        assert decode_or_skip(None, counts, kind="annotation") is None
    assert counts == {"num_bad_images": 2, "num_converted_images": 1}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2  # only the skips are logged, once each
    assert messages[0].startswith("Skipping image cut.png: unreadable") and "(1 skipped so far)" in messages[0]
    assert messages[1] == "Skipping annotation (bytes): missing (2 skipped so far)"


def test_load_image_stream_sources_and_errors(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 8, 2)
    dataset, column = load_image_stream(data_files=files)
    assert column == "image" and dataset.column_names == ["image"]
    globbed, _ = load_image_stream(data_files=str(tmp_path / "parquet" / "*.parquet"))
    assert globbed.info.description == dataset.info.description  # the same files, however they are named
    with pytest.raises(ValueError, match="exactly one"):
        load_image_stream(data_files=files, train_dir=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        load_image_stream()
    with pytest.raises(ValueError, match="not found"):
        load_image_stream(data_files=files, image_column_name="picture")
    with pytest.raises(ValueError, match=r"\.parquet"):
        load_image_stream(data_files=[str(tmp_path / "a.csv")])
    with pytest.raises(ValueError, match="matches no file"):
        load_image_stream(data_files=[str(tmp_path / "missing-*.parquet")])
    with pytest.raises(ValueError, match="min_shards"):
        load_image_stream(data_files=files, min_shards=0)
    with pytest.raises(ValueError, match="No image files"):
        load_image_stream(train_dir=str(tmp_path / "parquet"))


def test_image_folder_is_cut_into_shards_that_feed_every_worker(tmp_path):
    write_image_folder(tmp_path / "images", range(12), fmt="JPEG")
    dataset, column = load_image_stream(train_dir=str(tmp_path / "images"), min_shards=4)
    assert column == "image" and dataset.num_shards >= 4 and dataset.num_shards % 4 == 0
    loader = build_dataloader(ImageStream(dataset, column, pixel_and_worker, with_ids=True), 2, num_workers=2)
    assert loader.num_workers == 2
    batches = take_batches(loader, 6)  # one epoch
    paths = [path for batch in batches for path in batch["example_id"]]
    assert sorted(Path(path).name for path in paths) == [f"{index:03d}.jpeg" for index in range(12)]
    assert {worker for batch in batches for worker in batch["worker"].tolist()} == {0, 1}


def test_image_folder_splits(tmp_path):
    write_image_folder(tmp_path / "split" / "train", range(0, 4))
    write_image_folder(tmp_path / "split" / "val", range(10, 13))
    for split, expected in (("train", [0, 1, 2, 3]), ("validation", [10, 11, 12])):
        dataset, column = load_image_stream(train_dir=str(tmp_path / "split"), split=split)
        indices = [int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), len(expected))]
        assert sorted(indices) == expected, split
    with pytest.raises(ValueError, match=r"none of which is split 'test'.*test, testing"):
        load_image_stream(train_dir=str(tmp_path / "split"), split="test")
    # A folder without split sub-folders is whatever split it is opened as (e.g. a --validation_dir).
    dataset, column = load_image_stream(train_dir=str(tmp_path / "split" / "val"), split="validation")
    assert sorted(int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), 3)) == [
        10,
        11,
        12,
    ]


def test_parquet_row_groups_are_shards_that_feed_every_worker(tmp_path):
    files = write_parquet_shards(tmp_path, 16, 2, row_group_size=2)  # 2 files, 8 row groups
    dataset, column = load_image_stream(data_files=files, min_shards=4)
    assert dataset.num_shards >= 4 and dataset.num_shards % 4 == 0
    loader = build_dataloader(ImageStream(dataset, column, pixel_and_worker, seed=1, shuffle_buffer_size=3), 2, 2)
    assert loader.num_workers == 2
    batches = take_batches(loader, 8)  # one epoch
    assert sorted(index for batch in batches for index in batch["index"].tolist()) == list(range(16))
    assert {worker for batch in batches for worker in batch["worker"].tolist()} == {0, 1}


def test_arrow_files_are_cut_by_record_batches(tmp_path):
    table = image_table(range(8))
    stream_file, ipc_file = tmp_path / "stream.arrow", tmp_path / "file.arrow"
    with pa.ipc.new_stream(stream_file, table.schema) as writer:  # the format `datasets` writes
        writer.write_table(table, max_chunksize=2)
    with pa.ipc.new_file(ipc_file, table.schema) as writer:
        writer.write_table(image_table(range(8, 12)), max_chunksize=2)
    dataset, column = load_image_stream(data_files=[str(stream_file), str(ipc_file)], min_shards=2)
    assert column == "image" and dataset.num_shards >= 2 and dataset.num_shards % 2 == 0
    indices = [int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), 12)]
    assert sorted(indices) == list(range(12))


def test_ranks_and_workers_see_disjoint_examples(tmp_path):
    files = write_parquet_shards(tmp_path, 16, 4)
    dataset, column = load_image_stream(data_files=files)
    seen = []
    for rank in range(2):
        stream = ImageStream(dataset, column, pixel_index, rank=rank, world_size=2, seed=3, shuffle_buffer_size=4)
        seen.append({int(example["index"]) for example in read(stream, 8)})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(16))

    # Two DataLoader workers on one rank: every example of the epoch exactly once.
    stream = ImageStream(dataset, column, pixel_index, seed=3, shuffle_buffer_size=4)
    loader = build_dataloader(stream, batch_size=2, num_workers=2)
    indices = [index for batch in take_batches(loader, 8) for index in batch["index"].tolist()]
    assert sorted(indices) == list(range(16))


def test_more_workers_than_shards_are_capped_not_fatal(tmp_path, caplog):
    # One parquet file of one row group = one shard: a second worker would get nothing.
    files = write_parquet_shards(tmp_path, 6, 1)
    dataset, column = load_image_stream(data_files=files, min_shards=2)
    assert "The stream has 1 shard(s) for 2 reader(s)" in caplog.text and "parquet row groups" in caplog.text
    loader = build_dataloader(ImageStream(dataset, column, pixel_index), batch_size=2, num_workers=2)
    assert loader.num_workers == 1
    assert "Using 1 DataLoader worker(s) instead of 2: this rank's stream has 1 shard(s)" in caplog.text
    indices = [index for batch in take_batches(loader, 3) for index in batch["index"].tolist()]
    assert sorted(indices) == list(range(6))


def test_shuffle_is_seeded_and_changes_with_epoch(tmp_path):
    files = write_parquet_shards(tmp_path, 16, 4)
    dataset, column = load_image_stream(data_files=files)

    def order(seed):
        return [
            int(e["index"])
            for e in read(ImageStream(dataset, column, pixel_index, seed=seed, shuffle_buffer_size=8), 32)
        ]

    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    assert sorted(first[:16]) == list(range(16)) and sorted(first[16:]) == list(range(16))
    assert first[:16] != first[16:]  # the next epoch is reshuffled
    unshuffled = [int(e["index"]) for e in read(ImageStream(dataset, column, pixel_index), 16)]
    assert unshuffled != first[:16]


@pytest.mark.parametrize("stop_after", [5, 11, 12, 21])  # inside a window, at window boundaries, next epoch
def test_stream_state_resumes_the_same_sequence(tmp_path, stop_after):
    files = write_parquet_shards(tmp_path, 16, 4)
    dataset, column = load_image_stream(data_files=files)

    def make():
        return ImageStream(dataset, column, pixel_index, seed=5, shuffle_buffer_size=6)

    reference = read(make(), 30)
    interrupted = make()
    iterator = iter(interrupted)
    for _ in range(stop_after):
        next(iterator)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed_stream = make()
    resumed_stream.load_state_dict(state)
    resumed = read(resumed_stream, 30 - stop_after)
    assert [int(e["index"]) for e in resumed] == [int(e["index"]) for e in reference[stop_after:]]
    # The per-example generator (augmentation, masking) replays as well.
    assert [e["draw"] for e in resumed] == [e["draw"] for e in reference[stop_after:]]

    # A second interruption right after the resume (inside the resumed window) resumes exactly as well.
    iterator = iter(resumed_stream)
    next(iterator)
    again = make()
    again.load_state_dict(resumed_stream.state_dict())
    assert [int(e["index"]) for e in read(again, 8)] == [int(e["index"]) for e in reference[stop_after + 1 :][:8]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_resume_replays_the_uninterrupted_run(tmp_path, num_workers):
    # 2 files of 4 row groups: 8 shards, 4 per worker; two corrupt images, so the counters have something to count.
    files = write_parquet_shards(tmp_path, 16, 2, corrupt=(3, 12), row_group_size=2)
    dataset, column = load_image_stream(data_files=files, min_shards=max(1, num_workers))

    def loader():
        stream = ImageStream(dataset, column, pixel_index, seed=7, shuffle_buffer_size=3)
        return build_dataloader(stream, batch_size=3, num_workers=num_workers)

    reference_loader = loader()
    reference = iter(reference_loader)
    expected = [next(reference) for _ in range(9)]  # more than an epoch (14 good images)
    assert set(expected[0]) == {"index", "draw"}  # only the transform's fields: no bookkeeping
    expected_counts = image_counts(reference_loader)
    # Both corrupt images are skipped in the first epoch, and again when the second one reaches them.
    assert expected_counts["num_bad_images"] >= 2 and expected_counts["num_converted_images"] == 0

    interrupted = loader()
    batches = iter(interrupted)
    for _ in range(3):  # odd: with 2 workers the next batch is worker 1's, not where a fresh round robin starts
        next(batches)
    counts_at_stop = image_counts(interrupted)
    write_state(tmp_path, "loader", interrupted.state_dict())  # as a checkpoint stores it
    del batches, interrupted

    resumed = loader()
    resume_dataloader(resumed, read_state(tmp_path, "loader"))
    assert image_counts(resumed) == counts_at_stop  # before the first batch: the checkpoint's totals
    batches = iter(resumed)
    replayed = [next(batches) for _ in range(6)]
    for got, want in zip(replayed, expected[3:], strict=True):
        assert got["index"].tolist() == want["index"].tolist()
        assert got["draw"].tolist() == want["draw"].tolist()
    assert image_counts(resumed) == expected_counts  # the totals go on from the checkpoint's


def test_dataloader_state_round_trips_through_a_checkpoint_state_file(tmp_path):
    files = write_parquet_shards(tmp_path, 8, 2)
    dataset, column = load_image_stream(data_files=files, min_shards=2)
    loader = build_dataloader(ImageStream(dataset, column, pixel_index, shuffle_buffer_size=2), 2, num_workers=2)
    take_batches(loader, 3)
    state = loader.state_dict()
    write_state(tmp_path, "loader", state)
    assert read_state(tmp_path, "loader") == state
    with pytest.raises(ValueError, match="Not a StatefulDataLoader state"):
        resume_dataloader(loader, {"step": 3})


def test_resume_refuses_other_settings(tmp_path):
    files = write_parquet_shards(tmp_path, 8, 2)
    dataset, column = load_image_stream(data_files=files, min_shards=2)
    other_files = write_parquet_shards(tmp_path / "other", 8, 2)
    other_dataset, _ = load_image_stream(data_files=other_files, min_shards=2)

    def loader(num_workers=0, source=dataset, **settings):
        stream = ImageStream(source, column, pixel_index, **{"seed": 1, "shuffle_buffer_size": 4, **settings})
        return build_dataloader(stream, batch_size=2, num_workers=num_workers)

    saved = loader(num_workers=2)
    take_batches(saved, 1)
    state = saved.state_dict()
    resume_dataloader(loader(num_workers=2), state)  # the same settings are accepted

    mismatches = {
        "seed: saved 1, now 2": loader(num_workers=2, seed=2),
        "shuffle_buffer_size: saved 4, now 8": loader(num_workers=2, shuffle_buffer_size=8),
        "max_samples: saved None, now 6": loader(num_workers=2, max_samples=6),
        "world_size: saved 1, now 2": loader(num_workers=1, rank=0, world_size=2),
        "num_workers: saved 2, now 0": loader(num_workers=0),
        "source: saved 'parquet data files": loader(num_workers=2, source=other_dataset),
    }
    for message, other in mismatches.items():
        with pytest.raises(ValueError, match="Cannot resume the data stream") as error:
            resume_dataloader(other, state)
        assert message in str(error.value), (message, str(error.value))

    # The stream checks as well (in each worker, for a state loaded without resume_dataloader).
    stream_state = state["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]
    single = ImageStream(dataset, column, pixel_index, seed=1, shuffle_buffer_size=4)
    with pytest.raises(ValueError, match="num_workers: saved 2, now 0"):
        single.load_state_dict(stream_state)
    with pytest.raises(ValueError, match="older format"):
        single.load_state_dict({"epoch": 0, "window": 0, "offset": 3, "source": None})


def test_corrupt_images_are_skipped_and_counted(tmp_path, recwarn):
    files = write_parquet_shards(tmp_path, 8, 1, corrupt=(2, 5))
    dataset, column = load_image_stream(data_files=files)
    loader = build_dataloader(ImageStream(dataset, column, pixel_index), batch_size=3)
    assert not [warning for warning in recwarn if "set_vital" in str(warning.message)]  # torchdata's noise is muted
    assert image_counts(loader) == {"num_bad_images": 0, "num_converted_images": 0}
    batches = take_batches(loader, 2)
    assert [index for batch in batches for index in batch["index"].tolist()] == [0, 1, 3, 4, 6, 7]
    assert image_counts(loader) == {"num_bad_images": 2, "num_converted_images": 0}
    assert isinstance(batches[0]["index"], torch.Tensor) and set(batches[0]) == {"index", "draw"}


def test_converted_images_are_counted(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    for index in range(4):
        PIL.Image.new("L" if index % 2 else "RGB", (4, 4)).save(folder / f"{index}.png")
    dataset, column = load_image_stream(train_dir=str(folder))
    loader = build_dataloader(ImageStream(dataset, column, pixel_index), batch_size=2)
    take_batches(loader, 2)
    assert image_counts(loader) == {"num_bad_images": 0, "num_converted_images": 2}


def test_empty_stream_raises(tmp_path):
    files = write_parquet_shards(tmp_path, 4, 1, corrupt=(0, 1, 2, 3))
    dataset, column = load_image_stream(data_files=files)
    with pytest.raises(ValueError, match="no usable image"):
        read(ImageStream(dataset, column, pixel_index), 1)


def test_split_off_validation_is_deterministic_disjoint_and_complete(tmp_path):
    files = write_parquet_shards(tmp_path, 32, 4)
    dataset, column = load_image_stream(data_files=files)

    def all_indices(stream_dataset):
        # One pass over the undecoded stream: the pixel value is the index.
        return sorted(int(np.asarray(decode_image(example[column])[0])[0, 0, 0]) for example in stream_dataset)

    train, validation = split_off_validation(dataset, 0.25, seed=0)
    train_indices, validation_indices = all_indices(train), all_indices(validation)
    assert sorted(train_indices + validation_indices) == list(range(32))
    assert 0 < len(validation_indices) < 16
    assert all_indices(split_off_validation(dataset, 0.25, seed=0)[1]) == validation_indices
    assert all_indices(split_off_validation(dataset, 0.25, seed=1)[1]) != validation_indices
    # Both sides are distinct sources for a resume, and stream like any other source.
    assert len({dataset.info.description, train.info.description, validation.info.description}) == 3
    streamed = read(ImageStream(validation, column, pixel_index), len(validation_indices))
    assert sorted(int(example["index"]) for example in streamed) == validation_indices
    # ... and resume like any other source.
    reference = [int(example["index"]) for example in read(ImageStream(train, column, pixel_index, seed=2), 30)]
    interrupted = ImageStream(train, column, pixel_index, seed=2)
    iterator = iter(interrupted)
    for _ in range(7):
        next(iterator)
    resumed = ImageStream(train, column, pixel_index, seed=2)
    resumed.load_state_dict(interrupted.state_dict())
    assert [int(example["index"]) for example in read(resumed, 23)] == reference[7:]
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        split_off_validation(dataset, 1.0, seed=0)


def test_non_streaming_source_is_streamed_from_the_local_cache(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 8, 2)
    dataset, column = load_image_stream(
        data_files=files, streaming=False, cache_dir=str(tmp_path / "cache"), min_shards=4
    )
    assert dataset.num_shards == 8 and "prepared" in dataset.info.description
    stream = ImageStream(dataset, column, pixel_index, rank=1, world_size=2, shuffle_buffer_size=3)
    assert len({int(example["index"]) for example in read(stream, 4)}) == 4


def test_webdataset_tar_files(tmp_path, caplog):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for index in range(5):
            for name, data in ((f"{index:04d}.png", png_bytes(index)), (f"{index:04d}.cls", str(index).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset, column = load_image_stream(data_files=[str(shard)], min_shards=2)
    assert "split the data into more .tar files" in caplog.text  # one .tar = one shard, for 2 readers
    assert column == "png"  # the webdataset image column is named after the extension, found as an Image feature
    indices = sorted(int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), 5))
    assert indices == [0, 1, 2, 3, 4]


def test_dataset_with_too_few_files_is_split_by_row_groups(tmp_path, caplog):
    # A dataset folder (read like a Hub dataset) of one parquet file: 4 row groups become 4 shards for 2 readers.
    write_parquet_shards(tmp_path / "dataset" / "data", 8, 1, row_group_size=2)
    dataset, column = load_image_stream(dataset_name=str(tmp_path / "dataset"), min_shards=2)
    assert column == "image" and dataset.num_shards == 4 and "shard(s) for" not in caplog.text
    assert sorted(int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), 8)) == list(
        range(8)
    )
    # One row group cannot be split: the warning names the remedy.
    write_parquet_shards(tmp_path / "small" / "data", 4, 1)
    dataset, _ = load_image_stream(dataset_name=str(tmp_path / "small"), min_shards=2)
    assert dataset.num_shards == 1 and "pass --streaming false" in caplog.text
