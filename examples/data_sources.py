"""Where the training scripts' images come from: local folders, parquet, arrow and webdataset files, Hub datasets.

Every source becomes a `datasets.IterableDataset` whose image column is ``Image(decode=False)``: images are decoded
later, by :class:`image_datasets.ImageStream`, so that one corrupt file is skipped and counted instead of stopping the
run (``datasets`` decodes inside its iterator, where one bad file ends the iteration). This module only lists, shards
and splits sources; it never decodes an image.

Sharding. `datasets` hands whole shards to DataLoader workers (and, when the count divides, to ranks), so a source
must have at least ranks x workers shards for every worker to get data (``min_shards`` of :func:`load_image_stream`).
Local sources are cut into a multiple of ``min_shards`` shards from their file listing or file metadata, without
reading an image: an image folder by files, parquet files by row groups, ``.arrow`` files by record batches. A
webdataset ``.tar`` is one shard, and a Hub dataset has one shard per file (parquet ones are split by row groups when
that is too few); when a source still has too few shards, a warning names the remedy and
:func:`dataloader_state.build_dataloader` starts fewer workers.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import logging
import operator
import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, IterableDataset, load_dataset
from image_datasets import example_id

logger = logging.getLogger(__name__)

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
    """Open one split as an `IterableDataset` of at least ``min_shards`` shards whose image column is NOT decoded.

    Exactly one source:

    - ``dataset_name``: a Hub dataset (or local script/folder understood by `load_dataset`), ``split`` of it. When
      it has fewer than ``min_shards`` files and they are parquet, it is split by row groups; otherwise a warning
      says how to get more shards.
    - ``train_dir``: a folder of images, listed recursively (:data:`IMAGE_EXTENSIONS`, hidden entries skipped). If
      its top level has split folders (``train/``, ``validation/`` or ``val/``, ``test/``...) ``split`` picks one,
      otherwise the whole folder is the split whatever its name (so a validation folder is opened like a training
      folder). The images are read from their files in either ``streaming`` mode.
    - ``data_files``: local parquet, ``.arrow`` or webdataset ``.tar`` files or globs (the format is taken from the
      extension); ``split`` only names the result. A ``.tar`` file is one shard.

    With ``streaming=False`` a Hub dataset or the data files are first prepared in the local Arrow cache (a copy)
    and then streamed from it in ``min_shards`` or more shards.

    Args:
        min_shards (`int`): the number of readers, ranks x DataLoader workers. The stream gets a multiple of it
            (when the source has enough files, row groups or examples), so every reader gets as many shards.

    Returns:
        The stream (with a single column) and the name of its image column (``image_column_name`` or the first
        `Image` feature; ``"image"`` for an image folder). Its ``info.description`` names the source; it is part of
        the settings that :class:`image_datasets.ImageStream` checks on resume.
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
        dataset = _sharded_stream(
            _generate_folder_images, [_join_paths(chunk) for chunk in _chunks(files, min_shards)], column, {}
        )
        description = f"image folder {os.path.abspath(train_dir)}, split {split}: {_list_digest(files)}"
        return _finish(dataset, column, description, min_shards, "image files")

    if dataset_name:
        description = f"dataset {dataset_name}, config {dataset_config_name}, split {split}"
        if not streaming:
            dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
            return _finish_prepared(dataset, image_column_name, description, min_shards)
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, streaming=True, cache_dir=cache_dir)
        if dataset.num_shards < min_shards:
            dataset = dataset.reshard()  # parquet: one shard per row group; other formats are left as they are
        column = _image_column(dataset.features, image_column_name)
        return _finish(dataset, column, description, min_shards, "files")

    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    kind = _data_file_kind(patterns)
    files = _expand_data_files(patterns)
    description = f"{kind} data files, split {split}: {_list_digest(files)}"
    if not streaming:
        dataset = load_dataset(kind, data_files={split: files}, split=split, cache_dir=cache_dir)
        return _finish_prepared(dataset, image_column_name, description, min_shards)
    if kind == "webdataset":
        dataset = load_dataset(kind, data_files={split: files}, split=split, streaming=True, cache_dir=cache_dir)
        column = _image_column(dataset.features, image_column_name)
        return _finish(dataset, column, description, min_shards, "webdataset .tar files")
    read_parts = _parquet_row_groups if kind == "parquet" else _arrow_record_batches
    generate = _generate_parquet_rows if kind == "parquet" else _generate_arrow_rows
    features = _file_features(files[0], kind)
    column = _image_column(features, image_column_name)
    parts = [(file, index) for file in files for index in range(read_parts(file))]
    if not parts:
        raise ValueError(f"The --data_files {patterns} hold no data.")
    dataset = _sharded_stream(generate, _chunks(parts, min_shards), column, {"column": column})
    unit = "parquet row groups" if kind == "parquet" else "arrow record batches"
    return _finish(dataset, column, description, min_shards, unit)


def list_image_files(folder: str, split: str = "train") -> list[str]:
    """The image files of ``split`` in an image folder, as sorted absolute paths (see :func:`load_image_stream`)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--train_dir {folder!r} is not a folder.")
    root = os.path.abspath(folder)
    split_folders = {
        entry.name: entry.path
        for entry in os.scandir(root)
        if entry.is_dir() and any(entry.name.lower() in names for names in SPLIT_FOLDER_NAMES.values())
    }
    if split_folders:
        wanted = SPLIT_FOLDER_NAMES.get(split, (split,))
        roots = [path for name, path in sorted(split_folders.items()) if name.lower() in wanted]
        if not roots:
            raise ValueError(
                f"{folder!r} is split into the folders {sorted(split_folders)}, none of which is split {split!r} "
                f"(for it: {', '.join(wanted)})."
            )
    else:
        roots = [root]
    files = []
    for top in roots:
        for directory, subdirectories, names in os.walk(top, followlinks=True):
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            files.extend(
                os.path.join(directory, name)
                for name in names
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            )
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(roots)}.")
    return sorted(files)


def _finish(
    dataset: IterableDataset,
    column: str,
    description: str,
    min_shards: int,
    unit: str,
) -> tuple[IterableDataset, str]:
    """Keep only the undecoded image column, name the source, and warn when the workers will be starved."""
    if column not in (dataset.column_names or []):
        raise ValueError(f"Image column {column!r} not found; columns are {dataset.column_names}.")
    dataset = dataset.select_columns([column]).cast_column(column, Image(decode=False))
    dataset.info.description = description
    if dataset.num_shards < min_shards:
        logger.warning(
            "The stream has %d shard(s) for %d reader(s) (ranks x DataLoader workers): each reader needs a shard of "
            "its own, so fewer DataLoader workers will run. It is made of %s; %s",
            dataset.num_shards,
            min_shards,
            unit,
            _more_shards_remedy(unit),
        )
    return dataset, column


def _more_shards_remedy(unit: str) -> str:
    if unit == "webdataset .tar files":
        return "each .tar file is one shard: split the data into more .tar files (or pass --streaming false)."
    if unit == "files":
        return (
            "pass --streaming false (prepares the split locally and cuts it into enough shards) or use a dataset "
            "stored in more files."
        )
    if unit in ("parquet row groups", "arrow record batches"):
        return f"write the files in smaller {unit.split(' ', 1)[1]}, or use fewer DataLoader workers."
    return "use fewer DataLoader workers."


def _finish_prepared(
    dataset: Any, image_column_name: str | None, description: str, min_shards: int
) -> tuple[IterableDataset, str]:
    """Stream a prepared (map-style) split from the Arrow cache in enough contiguous shards."""
    column = _image_column(dataset.features, image_column_name)
    stream = dataset.to_iterable_dataset(num_shards=max(1, _num_shards(len(dataset), min_shards)))
    return _finish(stream, column, f"{description}, prepared", min_shards, "examples")


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


def _sharded_stream(generator: Callable, shards: list, column: str, kwargs: dict[str, Any]) -> IterableDataset:
    # `datasets` shards a generator by its list-valued keyword argument: one element per shard.
    return IterableDataset.from_generator(
        generator, features=Features({column: Image(decode=False)}), gen_kwargs={"shards": shards, **kwargs}
    )


def _join_paths(paths: list[str]) -> str:
    # One string per shard, not a list of paths: `from_generator` hashes its arguments with a pure-Python pickler,
    # which takes ~15 s for the 1.3M strings of ImageNet but no time for 64 long strings. NUL is never in a path.
    return "\0".join(paths)


def _generate_folder_images(shards: list[str]) -> Iterator[dict[str, str]]:
    for shard in shards:
        for path in shard.split("\0"):
            yield {"image": path}


def _parquet_row_groups(file: str) -> int:
    return pq.ParquetFile(file).metadata.num_row_groups


def _generate_parquet_rows(shards: list[list[tuple[str, int]]], column: str) -> Iterator[dict[str, Any]]:
    for shard in shards:
        for file, parts in itertools.groupby(shard, key=operator.itemgetter(0)):
            parquet_file = pq.ParquetFile(file)
            for _, row_group in parts:
                for value in parquet_file.read_row_group(row_group, columns=[column]).column(0).to_pylist():
                    yield {column: value}


def _open_arrow(file: str) -> list[pa.RecordBatch]:
    """All record batches of an Arrow IPC file (stream format, as `datasets` writes, or file format), memory-mapped:
    listing them reads no data."""
    source = pa.memory_map(file)
    try:
        return list(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(index) for index in range(reader.num_record_batches)]


def _arrow_record_batches(file: str) -> int:
    return len(_open_arrow(file))


def _generate_arrow_rows(shards: list[list[tuple[str, int]]], column: str) -> Iterator[dict[str, Any]]:
    for shard in shards:
        for file, parts in itertools.groupby(shard, key=operator.itemgetter(0)):
            batches = _open_arrow(file)
            for _, index in parts:
                for value in batches[index].column(column).to_pylist():
                    yield {column: value}


def _file_features(file: str, kind: str) -> Features:
    schema = pq.read_schema(file) if kind == "parquet" else _open_arrow_schema(file)
    return Features.from_arrow_schema(schema)


def _open_arrow_schema(file: str) -> pa.Schema:
    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source).schema
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).schema


def _data_file_kind(patterns: list[str]) -> str:
    kinds = {DATA_FILE_KINDS.get(pattern.rsplit(".", 1)[-1].lower()) for pattern in patterns}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"--data_files must all be .parquet, .tar (webdataset) or .arrow files; got {patterns}.")
    return kinds.pop()


def _expand_data_files(patterns: list[str]) -> list[str]:
    files = []
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
            raise ValueError(f"Image column {image_column_name!r} not found; columns are {list(features)}.")
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
    """Split a stream from :func:`load_image_stream` into a training and a held-out validation stream.

    Each example goes to validation when a hash of ``seed`` and its :func:`image_datasets.example_id` falls below ``fraction``.
    That id is the SHA-1 of the image bytes when they are inline (parquet, arrow, webdataset, Hub datasets), so
    duplicate images land on the same side; for an image folder it is the file's path, so moving the folder
    changes the split. No image is decoded; the two sides are disjoint and together the whole stream; every
    process and every run with the same ``seed`` agree on them, whatever the shard order or the number of ranks
    and workers. The validation side holds about ``fraction`` of the examples (the count is a binomial draw).

    Args:
        fraction (`float`): in (0, 1).
        image_column (`str`, *optional*): defaults to the first `Image` feature.

    Returns:
        ``(train, validation)``, both with as many shards as ``dataset``.
    """
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
