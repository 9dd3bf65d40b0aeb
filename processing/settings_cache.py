"""Rebuild an image processor's transform objects from its settings when, and only when, those settings change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

Built = TypeVar("Built")


class SettingsCache(Generic[Built]):
    """
    `build(**settings)` applied to a processor's current values of `names`, cached until one of them changes.

    transformers' processors read their attributes at call time, so `processor.mask_ratio = 0.5` and
    `processor(images, mask_ratio=0.5)` both take effect there; reading settings here, instead of building
    everything once in `__init__`, gives ours the same behaviour at the cost of one tuple comparison per call.
    """

    def __init__(self, names: tuple[str, ...], build: Callable[..., Built]):
        self.names = names
        self.build = build
        self._key: tuple | None = None
        self._built: Built | None = None

    def get(self, processor: Any, **overrides) -> Built:
        unknown = set(overrides) - set(self.names)
        if unknown:
            raise ValueError(f"Unknown setting(s) {sorted(unknown)}; accepted: image_mean, image_std, {self.names}")
        settings = {name: overrides.get(name, getattr(processor, name)) for name in self.names}
        key = tuple(tuple(value) if isinstance(value, list) else value for value in settings.values())
        if key != self._key:
            self._built, self._key = self.build(**settings), key
        return self._built
