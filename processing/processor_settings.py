"""What the two image processors share: per-call settings, the generator of a call, the removed `seed` argument."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)

# Seed of the generator a call uses when it is given none: the same call then gives the same output (a saved
# processor is deterministic, e.g. behind the Hub widget), masks included.
DEFAULT_SEED = 0

REMOVED_SEED_MESSAGE = (
    "`seed` is no longer an image processor setting and is ignored: the processor holds no random state. Pass a "
    "generator for each call instead: `processor(images, augmentation=processor.training_augmentation(), "
    "rng=numpy.random.default_rng(seed))`."
)
_REMOVED_DO_AUGMENT_MESSAGE = (
    "`do_augment` was replaced by an explicit augmentation and generator: `processor(images, "
    "augmentation=processor.training_augmentation(), rng=numpy.random.default_rng(seed))`."
)


def drop_removed_seed(constructor_kwargs: MutableMapping[str, Any]) -> None:
    """Removes `seed` from a processor's constructor arguments, with a warning. Earlier versions took it (and never
    saved it); leaving it out of the attributes keeps it out of the saved config now too."""
    if "seed" in constructor_kwargs:
        logger.warning(REMOVED_SEED_MESSAGE)
        del constructor_kwargs["seed"]


def check_view_size(view: PIL.Image.Image, size: int, view_name: str, setting_name: str) -> None:
    """Raises a ValueError when an augmentation's `view` is not the `size` x `size` square the processor's
    `setting_name` asks for (an augmentation built before the processor's sizes changed)."""
    if view.size != (size, size):
        raise ValueError(
            f"The augmentation's {view_name} is {view.size[0]}x{view.size[1]}, but the processor's {setting_name} is "
            f"{size}: build the augmentation with processor.training_augmentation() after changing sizes."
        )


def check_call_settings(
    settings: Mapping[str, Any], accepted: Iterable[str], augmentation_only: Iterable[str], processor_name: str
) -> None:
    """Raises a ValueError naming every per-call setting that `preprocess` does not read.

    `augmentation_only` are settings of the processor that configure `training_augmentation()` alone: passing them
    per call would silently do nothing, so the message says where they go.
    """
    accepted, augmentation_only = tuple(accepted), set(augmentation_only)
    if "do_augment" in settings:
        raise ValueError(_REMOVED_DO_AUGMENT_MESSAGE)
    if "seed" in settings:
        raise ValueError(f"Unknown setting 'seed' for {processor_name}.preprocess: pass `rng=` instead.")
    misplaced = sorted(name for name in settings if name in augmentation_only and name not in accepted)
    if misplaced:
        raise ValueError(
            f"{misplaced} only configure the training augmentation: build it with "
            f"`processor.training_augmentation({', '.join(f'{name}=...' for name in misplaced)})` and pass it as "
            "`augmentation=`."
        )
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown} for {processor_name}.preprocess; accepted: {list(accepted)}")


def check_augmentation_overrides(overrides: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Raises a ValueError naming every override `training_augmentation` does not read."""
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown augmentation setting(s) {unknown}; accepted: {list(accepted)}")


def resolve_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """The generator of one call: `rng` itself, a new one seeded with an int, or one with `DEFAULT_SEED`."""
    if rng is None:
        return np.random.default_rng(DEFAULT_SEED)
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}: {rng!r}")
