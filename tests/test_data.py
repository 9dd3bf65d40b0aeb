"""The shared streaming data module of the training scripts (examples/image_datasets.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from image_datasets import (  # noqa: E402
    ImageStream,
    StreamStateTracker,
    build_dataloader,
    decode_image,
    example_id,
    load_image_stream,
)


def png_bytes(value: int, size=(6, 5), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_shards(folder: Path, num_images: int, num_shards: int, corrupt: tuple[int, ...] = ()) -> list[str]:
    """`num_images` distinct images (the pixel value is the index) in `num_shards` parquet files."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    per_shard = num_images // num_shards
    for shard in range(num_shards):
        images = []
        for index in range(shard * per_shard, (shard + 1) * per_shard):
            data = png_bytes(index)[:20] if index in corrupt else png_bytes(index)
            images.append({"bytes": data, "path": f"{index}.png"})
        table = pa.table({"image": images, "label": list(range(len(images)))})
        table = table.replace_schema_metadata(
            {
                "huggingface": '{"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "Value", "dtype": "int64"}}}}'
            }
        )
        path = folder / f"train-{shard:02d}.parquet"
        pq.write_table(table, path)
        files.append(str(path))
    return files


def pixel_index(image: PIL.Image.Image, rng: np.random.Generator) -> dict:
    """A transform that keeps the image's identity (its pixel value) and one draw from the example's generator."""
    return {"index": np.asarray(image)[0, 0, 0].astype(np.int64), "draw": rng.random()}


def read(stream: ImageStream, count: int) -> list[dict]:
    iterator = iter(stream)
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


def test_load_image_stream_sources_and_errors(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 8, 2)
    dataset, column = load_image_stream(data_files=files)
    assert column == "image" and dataset.column_names == ["image"]
    with pytest.raises(ValueError, match="exactly one"):
        load_image_stream(data_files=files, train_dir=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        load_image_stream()
    with pytest.raises(ValueError, match="not found"):
        load_image_stream(data_files=files, image_column_name="picture")
    with pytest.raises(ValueError, match=r"\.parquet"):
        load_image_stream(data_files=[str(tmp_path / "a.csv")])

    folder = tmp_path / "folder" / "train" / "cat"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index}.png").write_bytes(png_bytes(index))
    dataset, column = load_image_stream(train_dir=str(tmp_path / "folder"))
    stream = ImageStream(dataset, column, pixel_index)
    assert sorted(int(example["index"]) for example in read(stream, 3)) == [0, 1, 2]


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
    indices = []
    for batch in loader:
        indices.extend(batch["index"].tolist())
        if len(indices) == 16:
            break
    assert sorted(indices) == list(range(16))


def test_more_workers_than_shards_are_capped_not_fatal(tmp_path, caplog):
    # One parquet file = one shard: a second worker would get nothing, and the stream raises on an empty epoch.
    files = write_parquet_shards(tmp_path, 6, 1)
    dataset, column = load_image_stream(data_files=files)
    loader = build_dataloader(ImageStream(dataset, column, pixel_index), batch_size=2, num_workers=2)
    assert loader.num_workers == 1
    assert "Using 1 DataLoader worker(s) instead of 2: this rank's stream has 1 shard(s)" in caplog.text
    indices = []
    for batch in loader:
        indices.extend(batch["index"].tolist())
        if len(indices) == 6:
            break
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


@pytest.mark.parametrize("stop_after", [5, 11, 21])  # inside a window, at a window boundary region, next epoch
def test_resume_replays_the_same_sequence(tmp_path, stop_after):
    files = write_parquet_shards(tmp_path, 16, 4)
    dataset, column = load_image_stream(data_files=files)

    def make():
        return ImageStream(dataset, column, pixel_index, seed=5, shuffle_buffer_size=6)

    reference = read(make(), 30)
    tracker = StreamStateTracker()
    tracker.update(
        {"stream_state": reference[stop_after - 1]["stream_state"], "num_bad_images": 0, "num_converted_images": 0}
    )
    resumed_stream = make()
    resumed_stream.load_state_dict(tracker.state_dict()["worker_states"])
    resumed = read(resumed_stream, 30 - stop_after)
    assert [int(e["index"]) for e in resumed] == [int(e["index"]) for e in reference[stop_after:]]
    # The per-example generator (augmentation, masking) replays as well.
    assert [e["draw"] for e in resumed] == [e["draw"] for e in reference[stop_after:]]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    files = write_parquet_shards(tmp_path, 8, 1, corrupt=(2, 5))
    dataset, column = load_image_stream(data_files=files)
    loader = build_dataloader(ImageStream(dataset, column, pixel_index), batch_size=3)
    tracker = StreamStateTracker()
    batches = iter(loader)
    indices = []
    for _ in range(2):
        batch = next(batches)
        tracker.update(batch)
        indices.extend(batch["index"].tolist())
    assert indices == [0, 1, 3, 4, 6, 7]
    assert tracker.num_bad_images == 2
    assert isinstance(batch["index"], torch.Tensor) and "stream_state" not in batch


def test_empty_stream_raises(tmp_path):
    files = write_parquet_shards(tmp_path, 4, 1, corrupt=(0, 1, 2, 3))
    dataset, column = load_image_stream(data_files=files)
    with pytest.raises(ValueError, match="no usable image"):
        read(ImageStream(dataset, column, pixel_index), 1)


def test_non_streaming_source_is_streamed_from_the_local_cache(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 8, 2)
    dataset, column = load_image_stream(data_files=files, streaming=False, cache_dir=str(tmp_path / "cache"))
    assert dataset.n_shards == 8
    stream = ImageStream(dataset, column, pixel_index, rank=1, world_size=2, shuffle_buffer_size=3)
    assert len({int(example["index"]) for example in read(stream, 4)}) == 4


def test_webdataset_tar_files(tmp_path):
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for index in range(5):
            for name, data in ((f"{index:04d}.png", png_bytes(index)), (f"{index:04d}.cls", str(index).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset, column = load_image_stream(data_files=[str(shard)])
    assert column == "png"  # the webdataset image column is named after the extension, found as an Image feature
    assert sorted(int(example["index"]) for example in read(ImageStream(dataset, column, pixel_index), 5)) == [
        0,
        1,
        2,
        3,
        4,
    ]
