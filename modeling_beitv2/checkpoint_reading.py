"""Reading released checkpoints safely: state dicts from `.pth` / `.bin` / `.safetensors`, and the DALL-E pickles.

Nothing here runs code from a checkpoint: `torch.load` always uses `weights_only=True`, with only the classes the
released files are known to hold admitted (argparse namespaces of unilm training checkpoints; inert stand-ins for
the `nn.Module` classes pickled into DALL-E's `encoder.pkl` / `decoder.pkl`).
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Where training checkpoints keep their weights: unilm's `model`, DeepSpeed's `module`, Lightning's `state_dict`.
_WRAPPER_KEYS = ("model", "module", "state_dict")

# The only classes the DALL-E `encoder.pkl` / `decoder.pkl` files contain besides tensors and containers.
_DALLE_PICKLED_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file into a flat `{name: tensor}` dict.

    `.safetensors` files are read with safetensors; anything else (`.pth`, `.pt`, `.bin`, `.ckpt`) with
    `torch.load(..., weights_only=True)`. The weights may sit at the top level or under `model`, `module`
    (DeepSpeed) or `state_dict` (first match wins, so a training checkpoint's optimizer state is ignored). A
    `module.` prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a checkpoint: the file is empty.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path} is not a safetensors checkpoint that can be read (cut short or corrupt: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__})."
            ) from None
    else:
        with path.open("rb") as file:
            magic = file.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
            raise ValueError(f"{path} is not a torch checkpoint: neither a zip-format torch file nor a pickle.")
        try:
            # Training checkpoints of the reference also pickle their argparse namespace; it only holds plain values.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = (
                "it holds Python objects other than tensors and plain values; convert it with the code that wrote it"
                if "global" in str(error).lower()
                else "the pickle is corrupt"
            )
            raise ValueError(f"{path} is not a checkpoint that can be read safely: {reason}.") from None
        except (EOFError, IndexError, RuntimeError, ValueError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(
                f"{path} is not a checkpoint that can be read: the file is cut short or corrupt "
                f"({type(error).__name__})."
            ) from None
    return unwrap_state_dict(checkpoint, source=str(path))


def unwrap_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the `{name: tensor}` mapping inside a loaded checkpoint (see [`load_state_dict`])."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, expected a dict of tensors.")
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{source}: no weights found under {list(_WRAPPER_KEYS)} nor at the top level; "
            f"these entries are not tensors: {not_tensors[:10]}"
        )
    state_dict = dict(checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


class _PickledModule:
    """Stand-in for every `nn.Module` class stored in the DALL-E pickles: it only keeps the pickled `__dict__`."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def load_dalle_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the parameters of a pickled DALL-E `Encoder` or `Decoder` without the `dall_e` package.

    The files are whole pickled modules. They are read with `torch.load(weights_only=True)` where each of the
    module classes they contain (and nothing else) is admitted as an inert stand-in that only stores its
    attributes; the parameters are then collected from the stand-ins' `_parameters` / `_modules` the way
    `nn.Module.state_dict` names them (e.g. `blocks.group_1.block_1.res_path.conv_1.w`).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DALL-E pickle {str(path)!r} does not exist or is not a file.")
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_PickledModule, name) for name in _DALLE_PICKLED_CLASSES
    ]
    try:
        with torch.serialization.safe_globals(stand_ins):
            root = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler reports a refused class as a generic UnpicklingError
        raise ValueError(f"{str(path)!r} is not a DALL-E encoder/decoder pickle: {error}") from error
    if not isinstance(root, _PickledModule):
        raise ValueError(f"{str(path)!r} holds a {type(root).__name__}, expected a pickled DALL-E module.")

    state_dict: dict[str, torch.Tensor] = {}

    def collect(module: _PickledModule, prefix: str) -> None:
        for name, parameter in module.__dict__.get("_parameters", {}).items():
            if parameter is not None:
                state_dict[prefix + name] = parameter.detach().clone()
        for name, child in module.__dict__.get("_modules", {}).items():
            if child is not None:
                collect(child, f"{prefix}{name}.")

    collect(root, "")
    return state_dict


def dalle_pickle_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """`(encoder.pkl, decoder.pkl)` of a DALL-E dVAE, given their folder or one of the two files."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    encoder, decoder = folder / "encoder.pkl", folder / "decoder.pkl"
    if path.is_file() and path.name not in ("encoder.pkl", "decoder.pkl"):
        raise ValueError(f"dalle_dvae expects the folder holding encoder.pkl and decoder.pkl, got the file {path}.")
    missing = [str(p) for p in (encoder, decoder) if not p.is_file()]
    if missing:
        raise ValueError(f"dalle_dvae needs both DALL-E pickles; not found: {missing}")
    return encoder, decoder
