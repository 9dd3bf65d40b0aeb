"""The pretraining scripts' data: sources -> per-rank shards -> decode-or-skip -> a stateful, exactly resumable loader.

:func:`load_image_stream` opens a source as a `datasets.IterableDataset` of at least ranks x workers shards whose
image column is not decoded; :class:`ImageStream` window-shuffles it, decodes each image with :func:`decode_or_skip`
(a corrupt file is skipped and counted instead of stopping the run) and transforms it; :func:`build_dataloader` wraps
it in a torchdata `StatefulDataLoader` whose state resumes exactly. docs/pretraining.md ("Data") tells how.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import itertools
import logging
import operator
import os
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from datasets import Features, Image, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from processing import DataCollatorForMaskedImageModeling, convert_to_rgb

logger = logging.getLogger(__name__)

# `(image, rng) -> model inputs`: every random choice (crops, flips, masks) is drawn from the example's own `rng`.
Transform = Callable[[PIL.Image.Image, np.random.Generator], dict[str, Any]]

# ---------------------------------------------------------------------------------------------------------------------
# Decoding, and the stream of one rank and worker


def decode_image(value: dict[str, Any] | None, convert: bool = True) -> tuple[PIL.Image.Image | None, str]:
    """Decode one undecoded `Image` value into an RGB image (or, with ``convert=False``, in its own mode, e.g. a
    segmentation map of class ids): ``(image, "ok")``, ``(image, "converted")`` when the mode was not RGB, or
    ``(None, reason)`` for an image that cannot be used (missing, unreadable/truncated bytes, zero size)."""
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
    """Decode one undecoded `Image` value with :func:`decode_image`, or log and count it as skipped (``None``): the
    one place every script reports a bad image. ``counts`` (from :func:`new_decode_counts`, or an
    :class:`ImageStream` state) is updated in place; ``kind`` names the value in the log ("image", "annotation")."""
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


# Where a worker stands (`source`: the `datasets` state at the start of the window) and what it has counted.
_START = {"epoch": 0, "window": 0, "offset": 0, "source": None, "num_bad_images": 0, "num_converted_images": 0}


class ImageStream(torch.utils.data.IterableDataset):
    """Per-rank, per-worker, endless and exactly resumable stream of transformed images for :func:`build_dataloader`.

    Ranks get disjoint examples (of the first ``max_samples`` per epoch), shuffled per epoch in windows of
    ``shuffle_buffer_size`` (0 keeps the stream order); ``with_ids`` adds each one's :func:`example_id`. A
    :meth:`state_dict` holds the position, the run's ``num_bad_images`` and ``num_converted_images``, and the
    ``settings`` a resume requires to match (docs/pretraining.md, "Data").
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        transform: Transform,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 0,
        max_samples: int | None = None,
        with_ids: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
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
        self.dataset, self.image_column, self.transform = dataset, image_column, transform
        self.rank, self.seed, self.shuffle_buffer_size, self.with_ids = rank, seed, shuffle_buffer_size, with_ids
        # Where the next iteration starts (the start, or a loaded state), and the live state of the current one.
        self._start: dict[str, Any] = dict(_START)
        self._live: dict[str, Any] | None = None

    def settings(self, num_workers: int) -> dict[str, Any]:
        """The settings a state of this stream is valid for, when read by ``num_workers`` DataLoader workers."""
        return {**self._settings, "num_workers": num_workers}

    def state_dict(self) -> dict[str, Any]:
        """This worker's position, counters and settings (JSON-serializable)."""
        position = self._live if self._live is not None else self._start
        return {"settings": self.settings(_num_workers()), **copy.deepcopy(position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration where ``state`` (this worker's :meth:`state_dict`) stood, if its settings match."""
        if "settings" not in state:
            raise ValueError(
                "This state was not written by ImageStream.state_dict (a checkpoint of an older format?)."
            )
        check_stream_settings(state["settings"], self.settings(_num_workers()))
        self._start = {key: copy.deepcopy(state[key]) for key in _START}
        self._live = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        # The live state is updated in place before each example is yielded, so that `state_dict` (which the
        # DataLoader calls after a batch, with the generator suspended) is the state after the last example.
        self._live = copy.deepcopy(self._start)
        return self._generate(self._live, worker.id if worker is not None else 0)

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
            # A window is read whole and permuted by (seed, epoch, window), so a state is a few integers: a rolling
            # buffer (as in `IterableDataset.shuffle`) would lose its content on resume.
            while window := list(itertools.islice(iterator, max(1, self.shuffle_buffer_size))):
                generator = np.random.default_rng([self.seed, state["epoch"], state["window"]])
                order = generator.permutation(len(window)) if self.shuffle_buffer_size else np.arange(len(window))
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


def _num_workers() -> int:
    worker = torch.utils.data.get_worker_info()
    return worker.num_workers if worker is not None else 0


def check_stream_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a ValueError naming every setting in which ``saved`` (the settings of a saved stream state) differs from
    ``current`` (:meth:`ImageStream.settings` of the stream that is resuming)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Sources: folders, files and Hub datasets, sharded without reading an image

# Files an image folder is made of (lower case); anything else in the folder (labels, metadata) is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Top-level folder names that mark an image folder as split into train/validation/test sub-folders (the words
# `datasets`' imagefolder understands).
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}

# Local sources are cut into about this many shards (rounded to a multiple of ``min_shards``): more shards than
# readers, so that the per-epoch shard shuffle has something to shuffle, few enough that each shard is long.
PREFERRED_NUM_SHARDS = 64

DATA_FILE_KINDS = {"parquet": "parquet", "tar": "webdataset", "arrow": "arrow"}


def load_image_stream(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    data_files: str | list[str] | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    streaming: bool = True,
    cache_dir: str | None = None,
    min_shards: int = 1,
) -> tuple[IterableDataset, str]:
    """Open ``split`` of exactly one source as an `IterableDataset` whose only column, the image, is NOT decoded.

    The source is a Hub dataset (``dataset_name``, or anything `load_dataset` reads), an image folder
    (``train_dir``, see :func:`list_image_files`) or local parquet, ``.arrow`` or webdataset ``.tar`` files or globs
    (``data_files``; ``split`` only names the result). ``streaming=False`` prepares a Hub dataset or the data files
    in the local Arrow cache first. The stream gets a multiple of ``min_shards`` (ranks x DataLoader workers) shards
    where the source allows, else a warning naming the remedy. Returns the stream, whose ``info.description`` names
    the source (a setting :class:`ImageStream` checks on resume), and its image column (``image_column_name`` or the
    first `Image` feature).
    """
    sources = {"dataset_name": dataset_name, "train_dir": train_dir, "data_files": data_files}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of --dataset_name, --train_dir, --data_files; got {given or 'none'}.")
    if min_shards < 1:
        raise ValueError(f"min_shards must be >= 1 (ranks x DataLoader workers), got {min_shards}.")

    if train_dir:
        column = _image_column(Features({"image": Image()}), image_column_name)
        files = list_image_files(train_dir, split)
        # One string per shard, not a list of paths: `from_generator` hashes its arguments with a pure-Python
        # pickler, which takes ~15 s for the 1.3M strings of ImageNet but no time for 64 long strings.
        shards = ["\0".join(chunk) for chunk in _chunks(files, min_shards)]  # NUL is never in a path
        dataset = _sharded_stream(_generate_folder_images, shards, column)
        description = f"image folder {os.path.abspath(train_dir)}, split {split}: {_list_digest(files)}"
        return _finish(dataset, column, description, min_shards, "image files; use fewer DataLoader workers.")

    if dataset_name:
        description = f"dataset {dataset_name}, config {dataset_config_name}, split {split}"
        source: dict[str, Any] = {"path": dataset_name, "name": dataset_config_name}
    else:
        assert data_files is not None  # the one source given
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
        kind = _data_file_kind(patterns)
        files = _expand_data_files(patterns)
        description = f"{kind} data files, split {split}: {_list_digest(files)}"
        source = {"path": kind, "data_files": {split: files}}
    if not streaming:  # prepared in the local Arrow cache, then streamed from it in enough contiguous shards
        prepared = load_dataset(**source, split=split, cache_dir=cache_dir)
        column = _image_column(prepared.features, image_column_name)
        stream = prepared.to_iterable_dataset(num_shards=max(1, _num_shards(len(prepared), min_shards)))
        return _finish(
            stream, column, f"{description}, prepared", min_shards, "examples; use fewer DataLoader workers."
        )
    if dataset_name:
        dataset = load_dataset(**source, split=split, streaming=True, cache_dir=cache_dir)
        if dataset.num_shards < min_shards:
            dataset = dataset.reshard()  # parquet: one shard per row group; other formats are left as they are
        remedy = (
            "files; pass --streaming false (prepares the split locally and cuts it into enough shards) or use a "
            "dataset stored in more files."
        )
        return _finish(dataset, _image_column(dataset.features, image_column_name), description, min_shards, remedy)
    if kind == "webdataset":
        dataset = load_dataset(**source, split=split, streaming=True, cache_dir=cache_dir)
        remedy = (
            "webdataset .tar files; each .tar file is one shard: split the data into more .tar files (or pass "
            "--streaming false)."
        )
        return _finish(dataset, _image_column(dataset.features, image_column_name), description, min_shards, remedy)
    layouts = [_file_layout(file, kind) for file in files]
    column = _image_column(Features.from_arrow_schema(layouts[0][0]), image_column_name)
    parts = [(file, index) for file, (_, num_parts) in zip(files, layouts) for index in range(num_parts)]
    if not parts:
        raise ValueError(f"The --data_files {patterns} hold no data.")
    dataset = _sharded_stream(_generate_rows, _chunks(parts, min_shards), column, column=column, kind=kind)
    unit = "row groups" if kind == "parquet" else "record batches"
    remedy = f"{kind} {unit}; write the files in smaller {unit}, or use fewer DataLoader workers."
    return _finish(dataset, column, description, min_shards, remedy)


def list_image_files(folder: str, split: str = "train") -> list[str]:
    """The image files (:data:`IMAGE_EXTENSIONS`, hidden entries skipped) of ``split`` in an image folder, listed
    recursively, as sorted absolute paths. When its top level has split folders (``train/``, ``val/``...) ``split``
    picks one; otherwise the whole folder is the split whatever its name (a validation folder opens as training)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--train_dir {folder!r} is not a folder.")
    root = os.path.abspath(folder)
    split_folders = {
        entry.name: entry.path
        for entry in os.scandir(root)
        if entry.is_dir() and any(entry.name.lower() in names for names in SPLIT_FOLDER_NAMES.values())
    }
    roots = [root]
    if split_folders:
        wanted = SPLIT_FOLDER_NAMES.get(split, (split,))
        roots = [path for name, path in sorted(split_folders.items()) if name.lower() in wanted]
        if not roots:
            raise ValueError(
                f"{folder!r} is split into the folders {sorted(split_folders)}, none of which is split {split!r} "
                f"(for it: {', '.join(wanted)})."
            )
    # `glob` skips hidden files and folders, and follows links to folders as `os.walk(followlinks=True)` does.
    files = [
        path
        for top in roots
        for path in glob.glob(os.path.join(glob.escape(top), "**", "*"), recursive=True)
        if path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(path)
    ]
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(roots)}.")
    return sorted(files)


def _finish(
    dataset: IterableDataset, column: str, description: str, min_shards: int, remedy: str
) -> tuple[IterableDataset, str]:
    """Keep only the undecoded image column, name the source, and warn when the workers will be starved."""
    if column not in (dataset.column_names or []):
        raise ValueError(f"Image column {column!r} not found; columns are {dataset.column_names}.")
    dataset = dataset.select_columns([column]).cast_column(column, Image(decode=False))
    dataset.info.description = description
    if dataset.num_shards < min_shards:
        logger.warning(
            "The stream has %d shard(s) for %d reader(s) (ranks x DataLoader workers): each reader needs a shard of "
            "its own, so fewer DataLoader workers will run. It is made of %s",
            dataset.num_shards,
            min_shards,
            remedy,
        )
    return dataset, column


def _num_shards(num_units: int, min_shards: int) -> int:
    """How many shards to cut ``num_units`` files/row groups/examples into: a multiple of ``min_shards`` (every
    reader gets as many) near :data:`PREFERRED_NUM_SHARDS`, and no more shards than units."""
    if num_units <= min_shards:
        return num_units
    return min_shards * min(max(1, PREFERRED_NUM_SHARDS // min_shards), num_units // min_shards)


def _chunks(items: list, min_shards: int) -> list[list]:
    """Deal ``items`` round-robin into shards, so that each shard spans the whole sorted listing (a shuffle window
    then mixes all classes of a class-per-folder layout instead of a few)."""
    num_shards = _num_shards(len(items), min_shards)
    return [items[index::num_shards] for index in range(num_shards)]


def _sharded_stream(generator: Callable, shards: list, image_column: str, **gen_kwargs: Any) -> IterableDataset:
    # `datasets` shards a generator by its list-valued keyword argument: one element per shard.
    features = Features({image_column: Image(decode=False)})
    return IterableDataset.from_generator(generator, features=features, gen_kwargs={"shards": shards, **gen_kwargs})


def _generate_folder_images(shards: list[str]) -> Iterator[dict[str, str]]:
    for shard in shards:
        for path in shard.split("\0"):
            yield {"image": path}


def _generate_rows(shards: list[list[tuple[str, int]]], column: str, kind: str) -> Iterator[dict[str, Any]]:
    for shard in shards:
        for file, parts in itertools.groupby(shard, key=operator.itemgetter(0)):
            indices = [index for _, index in parts]
            if kind == "parquet":
                tables = map(functools.partial(pq.ParquetFile(file).read_row_group, columns=[column]), indices)
            else:
                tables = map(_open_arrow(file)[1].__getitem__, indices)
            for table in tables:
                for value in table.column(column).to_pylist():
                    yield {column: value}


def _file_layout(file: str, kind: str) -> tuple[pa.Schema, int]:
    """The schema of a parquet or arrow file and its number of parts (row groups, record batches), from metadata."""
    if kind == "parquet":
        parquet_file = pq.ParquetFile(file)
        return parquet_file.schema_arrow, parquet_file.metadata.num_row_groups
    schema, batches = _open_arrow(file)
    return schema, len(batches)


def _open_arrow(file: str) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """The schema and record batches of an Arrow IPC file (stream format, as `datasets` writes, or file format),
    memory-mapped: listing them reads no data."""
    source = pa.memory_map(file)
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, list(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return reader.schema, [reader.get_batch(index) for index in range(reader.num_record_batches)]


def _data_file_kind(patterns: list[str]) -> str:
    extensions = {pattern.rsplit(".", 1)[-1].lower() for pattern in patterns}
    if len(extensions) != 1 or not extensions <= DATA_FILE_KINDS.keys():
        raise ValueError(f"--data_files must all be .parquet, .tar (webdataset) or .arrow files; got {patterns}.")
    return DATA_FILE_KINDS[extensions.pop()]


def _expand_data_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise ValueError(f"--data_files {pattern!r} matches no file.")
        files.extend(os.path.abspath(match) for match in matches)
    return list(dict.fromkeys(files))  # a file named by two patterns is read once


def _list_digest(files: list[str]) -> str:
    digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]
    return f"{len(files)} files, sha1 {digest}"


def _image_column(features: Features | None, image_column_name: str | None) -> str:
    if image_column_name is not None:
        if features is not None and image_column_name not in features:
            raise ValueError(f"--image_column_name {image_column_name} not found; columns are {list(features)}.")
        if features is not None and not isinstance(features[image_column_name], Image):
            images = [name for name, feature in features.items() if isinstance(feature, Image)]
            raise ValueError(
                f"--image_column_name {image_column_name} is not an image column (its feature is "
                f"{type(features[image_column_name]).__name__}); image columns: {images}."
            )
        return image_column_name
    for name, feature in (features or {}).items():
        if isinstance(feature, Image):
            return name
    raise ValueError(
        f"No Image feature among the columns {list(features or {})}; name the image column with --image_column_name."
    )


def split_off_validation(
    dataset: IterableDataset, fraction: float, seed: int, image_column: str | None = None
) -> tuple[IterableDataset, IterableDataset]:
    """Split a stream from :func:`load_image_stream` into a training and a held-out validation stream, both with as
    many shards as ``dataset``: an example is held out when a hash of ``seed`` and its :func:`example_id` falls below
    ``fraction``, so every process and run with the same ``seed`` agree on the sides without decoding an image."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
    column = _image_column(dataset.features, image_column)
    side = functools.partial(_is_on_side, column=column, fraction=fraction, seed=seed)
    train = dataset.filter(functools.partial(side, held_out=False))
    validation = dataset.filter(functools.partial(side, held_out=True))
    source = dataset.info.description or "an unnamed source"
    train.info.description = f"{source}; the {1 - fraction:g} not held out (seed {seed})"
    validation.info.description = f"{source}; the {fraction:g} held out (seed {seed})"
    return train, validation


def _is_on_side(example: dict[str, Any], column: str, fraction: float, seed: int, held_out: bool) -> bool:
    # A module-level function (not a lambda), so that the filter pickles into spawned DataLoader workers.
    digest = hashlib.sha1(f"{seed}\0{example_id(example[column] or {})}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") < fraction * 2**64) == held_out


# ---------------------------------------------------------------------------------------------------------------------
# The scripts' datasets and DataLoaders


def build_dataloader(
    stream: ImageStream,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> StatefulDataLoader:
    """A `StatefulDataLoader` over ``stream`` that snapshots its state at every batch, so a checkpoint can be taken at
    any step; ``collate_fn`` defaults to `processing.DataCollatorForMaskedImageModeling`. `datasets` hands whole
    shards to DataLoader workers, so the workers are capped at this rank's shard count, with a warning."""
    num_shards = stream.dataset.num_shards
    if num_workers > num_shards:
        logger.warning(
            "Using %d DataLoader worker(s) instead of %d: this rank's stream has %d shard(s) and each worker reads "
            "whole shards. Use a source with more files (or, for a Hub dataset, --streaming false, which prepares the "
            "split locally and cuts it into enough shards) to load with more workers.",
            num_shards,
            num_workers,
            num_shards,
        )
        num_workers = num_shards
    with warnings.catch_warnings():
        # torchdata 0.11 calls `torch.set_vital`, which torch deprecates: a warning for every loader, about nothing
        # the user can change.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return StatefulDataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=DataCollatorForMaskedImageModeling() if collate_fn is None else collate_fn,
            pin_memory=pin_memory,
            drop_last=True,
            snapshot_every_n_steps=1,
        )


def _stream_states(state: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """The number of workers and the ImageStream state of each, from a `StatefulDataLoader.state_dict()` (the
    layout of torchdata 0.11: one ``dataset_state`` without workers, one per ``_worker_snapshots`` entry with)."""
    if "_snapshot" in state:
        workers = state["_snapshot"]["_worker_snapshots"]
        return len(workers), [workers[key]["dataset_state"] for key in sorted(workers)]
    if "dataset_state" in state:
        return 0, [state["dataset_state"]]
    raise ValueError(f"Not a StatefulDataLoader state (keys {sorted(state)}).")


def resume_dataloader(dataloader: StatefulDataLoader, state: dict[str, Any]) -> None:
    """Load ``state`` (``dataloader.state_dict()`` of an earlier run) before iterating, so the next iteration goes on
    exactly where that run stood. The settings are checked here, in the main process, so a mismatch is one clear
    ValueError (naming each setting that differs) instead of a failure in each worker."""
    num_workers, stream_states = _stream_states(state)
    if any(not isinstance(saved, dict) or "settings" not in saved for saved in stream_states):
        raise ValueError("This dataloader state holds no ImageStream settings (a checkpoint of an older format?).")
    saved_settings = {**stream_states[0]["settings"], "num_workers": num_workers}
    check_stream_settings(saved_settings, dataloader.dataset.settings(dataloader.num_workers))
    dataloader.load_state_dict(state)


def image_counts(dataloader: StatefulDataLoader) -> dict[str, int]:
    """``num_bad_images`` and ``num_converted_images`` of this rank since the start of the run (a resumed run goes
    on counting from its checkpoint), as of the last batch yielded. Cheap: reads the loader's last snapshot."""
    if getattr(dataloader, "_iterator", None) is None:
        # Not iterated yet: `state_dict()` would start the iterator (and its workers) just to report the counts.
        state = dataloader.next_iter_state
        if state is None:
            return new_decode_counts()
    else:
        state = dataloader.state_dict()
    _, stream_states = _stream_states(state)
    return {key: sum(int(stream_state[key]) for stream_state in stream_states) for key in new_decode_counts()}


def image_transform(processor: Any, augment: bool) -> Transform:
    """The :data:`Transform` of the data loaders: `processor.pretraining_inputs` of one image (with its training
    augmentation when `augment`, else the evaluation views), each of `processor.pretraining_input_names` without the
    batch dimension."""
    augmentation = processor.training_augmentation() if augment else None

    def transform(image: PIL.Image.Image, rng: np.random.Generator) -> dict[str, Any]:
        features = processor.pretraining_inputs(image, augmentation=augmentation, rng=rng, return_tensors="np")
        return {name: features[name][0] for name in processor.pretraining_input_names}

    return transform


@dataclass(frozen=True)
class ImageSources:
    """Where :func:`load_datasets` reads: one training source (`dataset_name`, `train_dir` or `data_files`) and at
    most one validation source (`validation_dir`, `validation_split` of the training source, or a `train_val_split`
    fraction held out of the training data). `DataArguments.sources()` builds it from the command line."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_dir: str | None = None
    data_files: list[str] | None = None
    dataset_split: str = "train"
    validation_dir: str | None = None
    validation_split: str | None = None
    train_val_split: float | None = None
    image_column_name: str | None = None
    streaming: bool = True
    cache_dir: str | None = None


def load_datasets(
    sources: ImageSources, *, min_shards: int, do_eval: bool, seed: int
) -> tuple[IterableDataset, str, IterableDataset | None, str | None]:
    """The training dataset, its image column, the held-out dataset (None without `do_eval`) and its image column,
    each cut into at least `min_shards` (ranks x workers) shards where the source allows."""
    load = functools.partial(
        load_image_stream,
        image_column_name=sources.image_column_name,
        streaming=sources.streaming,
        cache_dir=sources.cache_dir,
        min_shards=min_shards,
    )
    training_source = (sources.dataset_name, sources.dataset_config_name, sources.train_dir, sources.data_files)
    train, image_column = load(*training_source, split=sources.dataset_split)
    if not do_eval:
        return train, image_column, None, None
    if sources.validation_dir is not None:
        return train, image_column, *load(train_dir=sources.validation_dir)
    if sources.validation_split is not None:
        return train, image_column, *load(*training_source, split=sources.validation_split)
    assert sources.train_val_split is not None  # DataArguments: --do_eval needs one of the three
    train, evaluation = split_off_validation(train, sources.train_val_split, seed)
    return train, image_column, evaluation, image_column


def stream_size(dataset: IterableDataset, split: str, max_samples: int | None) -> int | None:
    """Examples per epoch if the dataset's metadata or `max_samples` says, else None."""
    splits = getattr(dataset.info, "splits", None) or {}
    known = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return known if max_samples is None else min(known or max_samples, max_samples)


def training_dataloader(
    accelerator: Accelerator,
    dataset: IterableDataset,
    image_column: str,
    transform: Transform,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle_buffer_size: int,
    max_samples: int | None,
) -> StatefulDataLoader:
    """This rank's share of `dataset` through `transform`, shuffled, endless and exactly resumable (an
    :class:`ImageStream` in :func:`build_dataloader`), pinned on CUDA."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    stream = ImageStream(dataset, image_column, transform, rank, world_size, seed, shuffle_buffer_size, max_samples)
    return build_dataloader(stream, batch_size, num_workers, pin_memory=accelerator.device.type == "cuda")


class HeldOutImages(torch.utils.data.IterableDataset):
    """One ordered pass over this rank's share of the held-out images (the first `max_samples`), unusable images
    skipped and logged. The transform's random draws (MIM masks) depend only on the position, so every evaluation
    of a run sees the same inputs and the results are comparable."""

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        transform: Transform,
        rank: int,
        world_size: int,
        seed: int,
        max_samples: int | None,
    ) -> None:
        super().__init__()
        dataset = dataset if max_samples is None else dataset.take(max_samples)
        # In DataLoader workers, `datasets` splits the rank's shards between the workers itself.
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.image_column, self.transform, self.rank, self.seed = image_column, transform, rank, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = 0 if worker is None else worker.id
        counts = new_decode_counts()  # per pass: each evaluation logs the held-out images it skips
        for index, example in enumerate(self.dataset):
            image = decode_or_skip(example[self.image_column], counts)
            if image is not None:
                yield dict(self.transform(image, np.random.default_rng([self.seed, self.rank, worker_id, index])))


def evaluation_dataloader(
    accelerator: Accelerator,
    dataset: IterableDataset,
    image_column: str,
    transform: Transform,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    max_samples: int | None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`HeldOutImages` (workers capped at the shard count, the training loader's collator,
    pinned on CUDA): each iteration is one evaluation pass."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    images = HeldOutImages(dataset, image_column, transform, rank, world_size, seed, max_samples)
    return torch.utils.data.DataLoader(
        images,
        batch_size,
        num_workers=min(num_workers, images.dataset.num_shards),
        collate_fn=DataCollatorForMaskedImageModeling(),
        pin_memory=accelerator.device.type == "cuda",
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``: batches come from pinned memory on CUDA, so the copies overlap with the computation."""
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}
