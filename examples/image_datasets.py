"""The one place the training scripts load, stream, shard, shuffle and decode images.

Every source goes through `datasets` as a stream (a Hub dataset, an image folder, local parquet or webdataset files).
The image column is cast to ``Image(decode=False)`` and decoded here, so that one corrupt file is skipped and counted
instead of stopping the run (``datasets`` decodes inside its iterator, where one bad file ends the iteration).

Order of operations, per rank::

    stream (shards shuffled per epoch) -> split_dataset_by_node (rank) -> DataLoader worker shard
        -> window shuffle -> decode + convert to RGB (bad images skipped) -> transform -> batch

The window shuffle reads ``shuffle_buffer_size`` examples, permutes them with a generator seeded by
(seed, epoch, window index) and yields them. Its state is the ``datasets`` stream state at the start of the window
plus the offset inside it, so a checkpoint is a few integers and resuming replays exactly the same sequence (a
rolling shuffle buffer, as in ``IterableDataset.shuffle``, loses its content on resume).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from processing import convert_to_rgb

logger = logging.getLogger(__name__)


def load_image_stream(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    data_files: str | list[str] | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    streaming: bool = True,
    cache_dir: str | None = None,
) -> tuple[IterableDataset, str]:
    """Open a training split as an `IterableDataset` whose image column is NOT decoded.

    Exactly one source: ``dataset_name`` (Hub name or local script/folder understood by `load_dataset`),
    ``train_dir`` (an image folder), or ``data_files`` (parquet / webdataset ``.tar`` files or globs; the format is
    taken from the extension). With ``streaming=False`` the split is downloaded/prepared first and then streamed
    from the Arrow cache (useful for repeated epochs over a small local set).

    Returns:
        The stream and the name of its image column (``image_column_name`` or the first `Image` feature).
    """
    sources = {"dataset_name": dataset_name, "train_dir": train_dir, "data_files": data_files}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of --dataset_name, --train_dir, --data_files; got {given or 'none'}.")
    if dataset_name:
        dataset = load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
        )
    elif train_dir:
        dataset = load_dataset(
            "imagefolder", data_dir=train_dir, split=split, streaming=streaming, cache_dir=cache_dir
        )
    else:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        builder = _builder_for_files(files)
        dataset = load_dataset(
            builder, data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
        )
    if not streaming:
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(64, len(dataset))))

    image_column = image_column_name or _first_image_column(dataset)
    if image_column not in (dataset.column_names or []):
        raise ValueError(f"Image column {image_column!r} not found; columns are {dataset.column_names}.")
    dataset = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    return dataset, image_column


def _builder_for_files(files: list[str]) -> str:
    suffixes = {"parquet": "parquet", "tar": "webdataset", "arrow": "arrow"}
    kinds = {suffixes.get(file.rsplit(".", 1)[-1].lower()) for file in files}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"--data_files must all be .parquet, .tar (webdataset) or .arrow files; got {files}.")
    return kinds.pop()


def _first_image_column(dataset: IterableDataset) -> str:
    features = dataset.features or {}
    for name, feature in features.items():
        if isinstance(feature, Image):
            return name
    raise ValueError(
        f"No Image feature among the columns {list(features)}; name the image column with --image_column_name."
    )


def decode_image(value: dict[str, Any] | None, convert: bool = True) -> tuple[PIL.Image.Image | None, str]:
    """Decode one undecoded `Image` value into an RGB image (or, with ``convert=False``, in its own mode, e.g. a
    segmentation map of class ids).

    Returns:
        ``(image, "ok")``, ``(image, "converted")`` when the mode was not RGB, or ``(None, reason)`` for an image
        that cannot be used (missing, unreadable/truncated bytes, zero size).
    """
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        return None, "missing"
    try:
        image = Image().decode_example(value)
        image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return None, f"unreadable: {type(error).__name__}: {error}"
    if image.width == 0 or image.height == 0:
        return None, "zero size"
    if image.mode == "RGB" or not convert:
        return image, "ok"
    try:
        return convert_to_rgb(image), "converted"
    except ValueError as error:
        return None, f"unconvertible: {error}"


def example_id(value: dict[str, Any]) -> str:
    """A stable id of one example: the SHA-1 of its image bytes, or its path when the bytes are not inline."""
    if value.get("bytes") is not None:
        return hashlib.sha1(value["bytes"]).hexdigest()[:16]
    return str(value.get("path"))


class ImageStream(torch.utils.data.IterableDataset):
    """Per-rank, per-worker, resumable stream of transformed images for a `torch.utils.data.DataLoader`.

    Args:
        dataset (`datasets.IterableDataset`): from :func:`load_image_stream` (image column not decoded).
        image_column (`str`): name of the image column.
        transform (`Callable[[PIL.Image.Image, numpy.random.Generator], dict]`): turns one RGB image into a dict of
            arrays/tensors, drawing every random choice from the generator it is given. That generator is seeded
            by (seed, rank, worker, epoch, window, position), so augmentation and masking replay exactly on resume
            and never repeat across ranks or workers.
        rank, world_size (`int`): this process and the number of processes; ranks get disjoint examples.
        seed (`int`): seeds the shard order and the window shuffle (the same on every rank).
        shuffle_buffer_size (`int`): window size of the shuffle; 0 keeps the stream order.
        max_samples (`int`, *optional*): truncate the stream (per epoch, before splitting across ranks).
        with_ids (`bool`): add ``example_id`` (see :func:`example_id`) to each example.

    Each yielded example carries ``stream_state`` (the state after it, for checkpoints) and ``num_bad_images`` /
    ``num_converted_images`` since the previous one. Streams are endless: epochs follow one another.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        transform: Callable[[PIL.Image.Image, np.random.Generator], dict[str, Any]],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 0,
        max_samples: int | None = None,
        with_ids: bool = False,
    ):
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}.")
        if shuffle_buffer_size:
            # Shuffles the shard order only (a buffer of one yields every example at once, one input shard at a time
            # keeps the state exact); set_epoch reshuffles it. The window shuffle below mixes the examples.
            dataset = dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.with_ids = with_ids
        # Resume point per DataLoader worker id (None = start of the first epoch).
        self.resume_states: dict[int, dict] = {}

    def load_state_dict(self, worker_states: dict[int, dict]) -> None:
        """Resume from the per-worker states collected by :class:`StreamStateTracker`."""
        self.resume_states = {int(worker): state for worker, state in worker_states.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        state = copy.deepcopy(self.resume_states.get(worker_id)) or {"epoch": 0, "window": 0, "offset": 0}
        dataset = copy.deepcopy(self.dataset)
        bad = converted = 0
        while True:
            dataset.set_epoch(state["epoch"])
            if state.get("source") is not None:
                dataset.load_state_dict(state["source"])
            iterator = iter(dataset)
            from_epoch_start = state.get("source") is None and state["offset"] == 0
            produced_in_epoch = False
            while True:
                source_state = dataset.state_dict()
                window = self._read_window(iterator)
                if not window:
                    break
                order = self._window_order(len(window), state["epoch"], state["window"])
                for position in range(state["offset"], len(window)):
                    value = window[order[position]][self.image_column]
                    image, status = decode_image(value)
                    if image is None:
                        bad += 1
                        logger.warning("Skipping image %s: %s", (value or {}).get("path") or "(bytes)", status)
                        continue
                    converted += status == "converted"
                    rng = np.random.default_rng(
                        [self.seed, self.rank, worker_id, state["epoch"], state["window"], position]
                    )
                    example = dict(self.transform(image, rng))
                    if self.with_ids:
                        example["example_id"] = example_id(value)
                    next_state = {"epoch": state["epoch"], "window": state["window"], "source": source_state}
                    next_state["offset"] = position + 1
                    example["stream_state"] = (worker_id, next_state)
                    example["num_bad_images"], example["num_converted_images"] = bad, converted
                    bad = converted = 0
                    produced_in_epoch = True
                    yield example
                state.update(window=state["window"] + 1, offset=0)
            if not produced_in_epoch and from_epoch_start:
                raise ValueError(
                    f"Rank {self.rank} worker {worker_id} got no usable image in a whole epoch: the dataset is empty "
                    "or has fewer shards/examples than ranks x workers, or every image failed to decode."
                )
            state = {"epoch": state["epoch"] + 1, "window": 0, "offset": 0, "source": None}

    def _read_window(self, iterator: Iterator[dict]) -> list[dict]:
        size = max(1, self.shuffle_buffer_size)
        window = []
        for example in iterator:
            window.append(example)
            if len(window) == size:
                break
        return window

    def _window_order(self, length: int, epoch: int, window_index: int) -> np.ndarray:
        if not self.shuffle_buffer_size:
            return np.arange(length)
        generator = np.random.default_rng([self.seed, epoch, window_index])
        return generator.permutation(length)


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the transformed fields into tensors; sum the bad/converted counters; keep the last stream state."""
    batch: dict[str, Any] = {}
    bookkeeping = {"stream_state", "num_bad_images", "num_converted_images", "example_id"}
    for key in examples[0]:
        if key in bookkeeping:
            continue
        values = [example[key] for example in examples]
        batch[key] = torch.stack([torch.as_tensor(np.asarray(value)) for value in values])
    batch["stream_state"] = examples[-1]["stream_state"]
    batch["num_bad_images"] = sum(example["num_bad_images"] for example in examples)
    batch["num_converted_images"] = sum(example["num_converted_images"] for example in examples)
    if "example_id" in examples[0]:
        batch["example_ids"] = [example["example_id"] for example in examples]
    return batch


class StreamStateTracker:
    """Main-process record of where each DataLoader worker's stream stands, for checkpoints.

    With ``num_workers=0`` resuming replays exactly the uninterrupted sequence. With workers, each worker resumes
    at its own position (nothing lost or repeated), but the DataLoader restarts its round-robin at worker 0, so the
    interleaving of the workers' batches after a resume can differ from an uninterrupted run.
    """

    def __init__(self):
        self.worker_states: dict[int, dict] = {}
        self.num_bad_images = 0
        self.num_converted_images = 0

    def update(self, batch: dict[str, Any]) -> None:
        worker_id, state = batch.pop("stream_state")
        self.worker_states[int(worker_id)] = state
        self.num_bad_images += batch.pop("num_bad_images")
        self.num_converted_images += batch.pop("num_converted_images")

    def state_dict(self) -> dict[str, Any]:
        return {
            "worker_states": {str(worker): state for worker, state in self.worker_states.items()},
            "num_bad_images": self.num_bad_images,
            "num_converted_images": self.num_converted_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.worker_states = {int(worker): value for worker, value in state["worker_states"].items()}
        self.num_bad_images = state["num_bad_images"]
        self.num_converted_images = state["num_converted_images"]


def build_dataloader(
    stream: ImageStream, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over an :class:`ImageStream`; decoding and transforms run in its workers.

    `datasets` hands whole shards to DataLoader workers, so a worker beyond this rank's shard count would get no
    data: the number of workers is capped at that count (with a warning saying how to get more).
    """
    num_shards = stream.dataset.num_shards
    if num_workers > num_shards:
        logger.warning(
            "Using %d DataLoader worker(s) instead of %d: this rank's stream has %d shard(s) and each worker reads "
            "whole shards. Use a dataset with more files (or --streaming false, which prepares the split locally "
            "and splits it into more shards) to load with more workers.",
            num_shards,
            num_workers,
            num_shards,
        )
        num_workers = num_shards
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_examples,
        pin_memory=pin_memory,
        persistent_workers=False,
        drop_last=True,
    )
