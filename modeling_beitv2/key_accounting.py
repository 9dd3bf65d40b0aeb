"""Key accounting for checkpoint conversion: every source key is either mapped, dropped by name, or reported.

A conversion hands each source key it maps to a [`KeyAccountant`]; [`KeyAccountant.finish`] then raises a
`ValueError` that lists the keys no rule consumed and the keys a rule needed but the checkpoint lacks, so a
checkpoint of another layout fails loudly instead of loading partly. [`load_into`] checks the converted dict
against the target model's own state dict before loading it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# Buffers that only hold values derived from the configuration (rebuilt by the target model).
DERIVED_KEYS = (r"relative_position_index$",)


class KeyAccountant:
    """Hands out the tensors of a source state dict and remembers which were used, missing or left over.

    Args:
        state_dict: the source checkpoint's `{name: tensor}`.
        drop_patterns: regexes of keys that hold derived values; they count as used.
        source: what the checkpoint is, for the error message.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], drop_patterns: Iterable[str] = (), source: str = ""):
        self.state_dict = state_dict
        self.source = source
        drop = [re.compile(p) for p in drop_patterns]
        self.used = {k for k in state_dict if any(p.search(k) for p in drop)}
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def take(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (marked as used); a missing key is recorded and a placeholder returned."""
        if key not in self.state_dict:
            self.missing.append(key)
            return torch.empty(0)
        self.used.add(key)
        return self.state_dict[key]

    def take_optional(self, key: str) -> torch.Tensor | None:
        """The tensor under `key` (marked as used), or `None` where the checkpoint does not have it."""
        return self.take(key) if key in self.state_dict else None

    def finish(self) -> None:
        """Raise a `ValueError` naming the unknown and the missing keys, if there are any."""
        unknown = sorted(set(self.state_dict) - self.used)
        if unknown or self.missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} unknown key(s): {unknown}")
            if self.missing:
                parts.append(f"{len(self.missing)} missing key(s): {sorted(self.missing)}")
            raise ValueError(f"{self.source or 'checkpoint'} does not match the expected layout; " + "; ".join(parts))


def load_into(model: torch.nn.Module, converted: dict[str, torch.Tensor], what: str) -> None:
    """Copy `converted` into `model`, requiring the exact key set and shapes (persistent entries only)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if converted[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"Converted {what} weights do not fit the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong_shape}"
        )
    model.load_state_dict(converted, strict=True)
