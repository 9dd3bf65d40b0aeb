"""Decode images, and stream them per rank and DataLoader worker, shuffled and resumable exactly.

:func:`decode_or_skip` is the one place a bad image is skipped and counted, for every script. :class:`ImageStream`
turns a source of :mod:`data_sources` (image column not decoded) into this rank's and worker's endless stream of
transformed examples. Order of operations, per rank::

    source (shards shuffled per epoch) -> split_dataset_by_node (rank) -> DataLoader worker shards
        -> window shuffle -> decode + convert to RGB (bad images skipped) -> transform -> batch

The window shuffle reads ``shuffle_buffer_size`` examples, permutes them with a generator seeded by
(seed, epoch, window index) and yields them. A worker's position is the ``datasets`` stream state at the start of
the window plus the offset inside it, so a checkpoint is a few integers and resuming replays exactly the same
sequence (a rolling shuffle buffer, as in ``IterableDataset.shuffle``, loses its content on resume). The DataLoader
over a stream, and its state, are in :mod:`dataloader_state`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Image, IterableDataset
from datasets.distributed import split_dataset_by_node

from processing import convert_to_rgb

logger = logging.getLogger(__name__)


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


def decode_or_skip(
    value: dict[str, Any] | None, counts: MutableMapping[str, int], convert: bool = True, kind: str = "image"
) -> PIL.Image.Image | None:
    """Decode one undecoded `Image` value with :func:`decode_image`, or log and count it as skipped.

    The one place a bad image is reported: every script that decodes images calls this, so a skip is logged once,
    with its reason and the running count, and counted the same way everywhere.

    Args:
        value (`dict` or `None`): an undecoded `Image` value (``{"bytes": ..., "path": ...}``).
        counts (`MutableMapping[str, int]`): counters updated in place: ``num_bad_images`` (skipped) and
            ``num_converted_images`` (not RGB, converted); :func:`new_decode_counts` makes one, and an
            :class:`ImageStream` state holds them too.
        convert (`bool`): convert to RGB (``False`` keeps the image's own mode, e.g. a segmentation map).
        kind (`str`): what the value is, for the log message ("image", "annotation").

    Returns:
        The decoded image, or ``None`` when it cannot be used (missing, unreadable, zero size, unconvertible).
    """
    image, status = decode_image(value, convert=convert)
    if image is None:
        counts["num_bad_images"] += 1
        path = (value or {}).get("path") or "(bytes)"
        logger.warning("Skipping %s %s: %s (%d skipped so far)", kind, path, status, counts["num_bad_images"])
        return None
    counts["num_converted_images"] += status == "converted"
    return image


def new_decode_counts() -> dict[str, int]:
    """Zeroed counters for :func:`decode_or_skip`."""
    return {"num_bad_images": 0, "num_converted_images": 0}


def example_id(value: dict[str, Any]) -> str:
    """A stable id of one example: the SHA-1 of its image bytes, or its path when the bytes are not inline."""
    if value.get("bytes") is not None:
        return hashlib.sha1(value["bytes"]).hexdigest()[:16]
    return str(value.get("path"))


# What an ImageStream state holds besides its settings: where the worker stands and what it has counted so far.
_POSITION_KEYS = ("epoch", "window", "offset", "source", "num_bad_images", "num_converted_images")
_START = {"epoch": 0, "window": 0, "offset": 0, "source": None, "num_bad_images": 0, "num_converted_images": 0}


class ImageStream(torch.utils.data.IterableDataset):
    """Per-rank, per-worker, resumable stream of transformed images for :func:`dataloader_state.build_dataloader`.

    Args:
        dataset (`datasets.IterableDataset`): from :func:`data_sources.load_image_stream` (image column not decoded).
        image_column (`str`): name of the image column.
        transform (`Callable[[PIL.Image.Image, numpy.random.Generator], dict]`): turns one RGB image into a dict of
            arrays/tensors (the model inputs), drawing every random choice from the generator it is given. That
            generator is seeded by (seed, rank, worker, epoch, window, position), so augmentation and masking replay
            exactly on resume and never repeat across ranks or workers.
        rank, world_size (`int`): this process and the number of processes; ranks get disjoint examples.
        seed (`int`): seeds the shard order and the window shuffle (the same on every rank).
        shuffle_buffer_size (`int`): window size of the shuffle; 0 keeps the stream order.
        max_samples (`int`, *optional*): truncate the stream (per epoch, before splitting across ranks).
        with_ids (`bool`): add ``example_id`` (see :func:`example_id`) to each example, to audit which examples
            were seen (tests).

    Streams are endless: epochs follow one another. Each example is the transform's dict (plus ``example_id``);
    the bookkeeping lives in :meth:`state_dict`, which a `StatefulDataLoader` collects from every worker:

    - the position: ``epoch``, ``window``, ``offset`` in the window and ``source`` (the `datasets` state at the
      start of the window);
    - ``num_bad_images`` (skipped: missing, unreadable, zero size) and ``num_converted_images`` (not RGB), counted
      since the start of the run (a resumed run continues them);
    - ``settings``: the source (``info.description`` of the dataset), its shard count, rank, world size, number of
      DataLoader workers, seed, shuffle buffer size and max samples, which :meth:`load_state_dict` requires to
      match.
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
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}.")
        self._settings = {
            "source": dataset.info.description or "an unnamed source",
            "num_shards": dataset.num_shards,
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "shuffle_buffer_size": shuffle_buffer_size,
            "max_samples": max_samples,
        }
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
        # Where the next iteration starts (the start, or a loaded state), and the live state of the current one.
        self._start: dict[str, Any] = dict(_START)
        self._live: dict[str, Any] | None = None

    def settings(self, num_workers: int) -> dict[str, Any]:
        """The settings a state of this stream is valid for, when read by ``num_workers`` DataLoader workers."""
        return {**self._settings, "num_workers": num_workers}

    def state_dict(self) -> dict[str, Any]:
        """This worker's position, counters and settings (JSON-serializable; see the class docstring)."""
        worker = torch.utils.data.get_worker_info()
        position = self._live if self._live is not None else self._start
        state = {key: copy.deepcopy(position[key]) for key in _POSITION_KEYS}
        return {"settings": self.settings(worker.num_workers if worker is not None else 0), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration where ``state`` (from :meth:`state_dict` of the same worker) stood.

        Raises:
            ValueError: when ``state`` was written with other settings (see the class docstring).
        """
        if "settings" not in state:
            raise ValueError(
                "This state was not written by ImageStream.state_dict (a checkpoint of an older format?)."
            )
        worker = torch.utils.data.get_worker_info()
        check_stream_settings(state["settings"], self.settings(worker.num_workers if worker is not None else 0))
        self._start = {key: copy.deepcopy(state[key]) for key in _POSITION_KEYS}
        self._live = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        # The live state is updated in place before each example is yielded, so that `state_dict` (which the
        # DataLoader calls after a batch, with the generator suspended) is the state after the last example.
        self._live = copy.deepcopy(self._start)
        return self._generate(self._live, worker_id)

    def _generate(self, state: dict[str, Any], worker_id: int) -> Iterator[dict[str, Any]]:
        dataset = copy.deepcopy(self.dataset)
        while True:
            dataset.set_epoch(state["epoch"])
            if state["source"] is not None:
                dataset.load_state_dict(state["source"])
            from_epoch_start = state["source"] is None and state["offset"] == 0
            # `dataset.state_dict()` is only current once its iterator has yielded, so the first window starts at the
            # loaded state (None: the start of the epoch) and each later one where reading the previous one stopped.
            window_source = state["source"]
            iterator = iter(dataset)
            produced_in_epoch = False
            while window := self._read_window(iterator):
                order = self._window_order(len(window), state["epoch"], state["window"])
                for position in range(state["offset"], len(window)):
                    value = window[order[position]][self.image_column]
                    image = decode_or_skip(value, state)  # counts into the state's num_bad/converted_images
                    if image is None:
                        continue
                    rng = np.random.default_rng(
                        [self.seed, self.rank, worker_id, state["epoch"], state["window"], position]
                    )
                    example = dict(self.transform(image, rng))
                    if self.with_ids:
                        example["example_id"] = example_id(value)
                    state.update(source=window_source, offset=position + 1)
                    produced_in_epoch = True
                    yield example
                window_source = dataset.state_dict()
                state.update(window=state["window"] + 1, offset=0, source=window_source)
            if not produced_in_epoch and from_epoch_start:
                raise ValueError(
                    f"Rank {self.rank} worker {worker_id} got no usable image in a whole epoch: the dataset is empty "
                    "or has fewer shards/examples than ranks x workers, or every image failed to decode."
                )
            state.update(epoch=state["epoch"] + 1, window=0, offset=0, source=None)

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


def check_stream_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a ValueError naming every setting in which a saved stream state differs from the current stream.

    Args:
        saved (`dict`): the ``settings`` of a saved :meth:`ImageStream.state_dict`.
        current (`dict`): :meth:`ImageStream.settings` of the stream that is resuming.
    """
    differences = [
        f"{name}: saved {saved.get(name)!r}, now {value!r}"
        for name, value in current.items()
        if saved.get(name) != value
    ]
    if differences:
        raise ValueError(
            "Cannot resume the data stream: the checkpoint was written with other data settings ("
            + "; ".join(differences)
            + "). Resume with the same data source, seed, shuffle buffer size, max samples, number of processes and "
            "DataLoader workers, or start a fresh run."
        )
