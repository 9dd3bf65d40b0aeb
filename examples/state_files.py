"""State dicts (optimizer, scheduler, grad scaler, RNG, loop and data-loader states) as JSON + safetensors, no pickle.

Optimizer, scheduler and RNG states are nested dicts/lists/tuples of scalars and tensors. :func:`write_state` keeps
the structure in a JSON file, with tags where JSON alone would lose the type: ``{"__tensor__": name}`` for a tensor
(stored in a safetensors file next to it under that name), ``{"__tuple__": [...]}`` for a tuple (AdamW's betas,
python's RNG state) and ``{"__items__": [[key, value], ...]}`` for a dict with non-string keys (the optimizer's
per-parameter state). :func:`read_state` gives back an equal object; reading executes no code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# The keys that mark a tagged value (see the module docstring); a dict holding one is stored as items.
_TAGS = ("__tensor__", "__tuple__", "__items__")


def write_state(folder: Path, stem: str, state: Any) -> None:
    """Write ``state`` as ``folder/{stem}.json``, plus ``folder/{stem}.safetensors`` when it holds tensors.

    Raises:
        TypeError: ``state`` holds something other than tensors, numbers, strings, None, lists, tuples and dicts.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, stem)
    if tensors:
        save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(encoded))


def read_state(folder: Path, stem: str) -> Any:
    """What :func:`write_state` wrote; tensors come back on the CPU (``load_state_dict`` moves them)."""
    encoded = json.loads((folder / f"{stem}.json").read_text())
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return _decode(encoded, tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = path
        while name in tensors:  # only for dict keys that contain dots; keeps names unique
            name += "_"
        # A copy on the CPU: safetensors refuses tensors that share memory, and writes from host memory anyway.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not any(tag in value for tag in _TAGS):
            return {key: _encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {
            "__items__": [
                [_encode(key, tensors, f"{path}.key"), _encode(item, tensors, f"{path}.{key}")]
                for key, item in value.items()
            ]
        }
    raise TypeError(
        f"Cannot store {type(value).__name__} at {path!r} in a checkpoint without pickle; state dicts may hold "
        "tensors, numbers, strings, None, lists, tuples and dicts."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if len(value) == 1 and "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if len(value) == 1 and "__items__" in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["__items__"]}
    return {key: _decode(item, tensors) for key, item in value.items()}
