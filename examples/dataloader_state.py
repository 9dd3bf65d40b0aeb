"""The training DataLoader over an :class:`image_datasets.ImageStream`, and its state: resume, counts, JSON.

:func:`build_dataloader` returns a torchdata ``StatefulDataLoader`` that snapshots every worker's
:meth:`ImageStream.state_dict` (position, bad/converted image counters and the settings the stream was built with)
at every batch, and restores them together with its round-robin position over the workers: a resumed run yields
exactly the batches of the uninterrupted one, with any number of workers. :func:`resume_dataloader` refuses a state
written with other settings, and :func:`dataloader_state_to_json` / :func:`dataloader_state_from_json` carry the
state through a JSON file.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

from image_datasets import ImageStream, check_stream_settings
from torchdata.stateful_dataloader import StatefulDataLoader

from processing import DataCollatorForMaskedImageModeling

logger = logging.getLogger(__name__)


def build_dataloader(
    stream: ImageStream,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> StatefulDataLoader:
    """A `StatefulDataLoader` over an :class:`ImageStream` that snapshots its state at every batch, so a checkpoint
    can be taken at any step; decoding and transforms run in its workers. Batches are collated by `collate_fn`,
    by default `processing.DataCollatorForMaskedImageModeling` (model inputs with their dtypes, other fields stacked,
    strings such as ``example_id`` kept as lists).

    `datasets` hands whole shards to DataLoader workers, so a worker beyond this rank's shard count would get no
    data: the number of workers is capped at that count (with a warning saying how to get more).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
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
    """Check that ``state`` (``dataloader.state_dict()`` of an earlier run) was written with this dataloader's data
    settings, then load it: the next ``iter(dataloader)`` continues exactly where that run stood.

    Call it before iterating. The check runs here, in the main process, so a mismatch is one clear error instead
    of a failure in each worker.

    Raises:
        ValueError: naming each setting (source, seed, shuffle buffer size, max samples, world size, number of
            workers...) whose saved value differs from the current one.
    """
    stream = dataloader.dataset
    if not isinstance(stream, ImageStream):
        raise ValueError(f"resume_dataloader needs a dataloader of build_dataloader; its dataset is a {type(stream)}.")
    num_workers, stream_states = _stream_states(state)
    if any(not isinstance(saved, dict) or "settings" not in saved for saved in stream_states):
        raise ValueError("This dataloader state holds no ImageStream settings (a checkpoint of an older format?).")
    saved_settings = {**stream_states[0]["settings"], "num_workers": num_workers}
    check_stream_settings(saved_settings, stream.settings(dataloader.num_workers))
    dataloader.load_state_dict(state)


def image_counts(dataloader: StatefulDataLoader) -> dict[str, int]:
    """``num_bad_images`` and ``num_converted_images`` of this rank since the start of the run (a resumed run goes
    on counting from its checkpoint), as of the last batch yielded. Cheap: reads the loader's last snapshot."""
    if getattr(dataloader, "_iterator", None) is None:
        # Not iterated yet: `state_dict()` would start the iterator (and its workers) just to report the counts.
        state = dataloader.next_iter_state
        if state is None:
            return {"num_bad_images": 0, "num_converted_images": 0}
    else:
        state = dataloader.state_dict()
    _, stream_states = _stream_states(state)
    return {
        key: sum(int(stream_state[key]) for stream_state in stream_states)
        for key in ("num_bad_images", "num_converted_images")
    }


def dataloader_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """``dataloader.state_dict()`` as an object that `json.dump` writes and :func:`dataloader_state_from_json`
    reads back equal to ``state``.

    Raises:
        ValueError: if the state holds something JSON cannot carry faithfully (a value that is not a str, int,
            float, bool or None; a non-str dict key; a tuple), naming where.
    """
    _check_json_faithful(state, "state")
    return json.loads(json.dumps(state))


def dataloader_state_from_json(obj: dict[str, Any]) -> dict[str, Any]:
    """The dataloader state that :func:`dataloader_state_to_json` wrote, read back with `json.load`.

    Raises:
        ValueError: if ``obj`` is not a `StatefulDataLoader` state.
    """
    state = copy.deepcopy(obj)
    _stream_states(state)
    return state


def _check_json_faithful(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}, which JSON would turn into a string.")
            _check_json_faithful(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_faithful(item, f"{where}[{index}]")
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        raise ValueError(f"{where} is a {type(value).__name__}, which JSON cannot carry faithfully: {value!r}.")
