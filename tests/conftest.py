"""Shared fixtures: tiny configs, a way to run code in a fresh Python process without this repo, and helpers for
running the pretraining scripts in process: their tiny inputs (parquet shards, image folders, a VQ-KD tokenizer, a
ViT teacher) and command lines. The builders import only `modeling_beitv2` and transformers, never the helper
modules of `examples/`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

# Tests are small; more threads than cores only adds contention on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Prepended to code run by `run_without_package`: makes `import modeling_beitv2` / `import processing` fail the
# way it would on a machine that only has transformers, so Hub custom code must stand on its own.
_BLOCK_PACKAGES = """
import sys
class _BlockRepoPackages:
    blocked = {"modeling_beitv2", "processing"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _BlockRepoPackages())
sys.path = [p for p in sys.path if p not in ("", ".", %r)]
"""


# transformers' own test modules (its common mixins), fetched from its sdist by tests/fetch_transformers_tests.py.
TRANSFORMERS_TESTS_DIR = Path(
    os.environ.get("TRANSFORMERS_COMMON_TESTS_DIR", REPO_ROOT / "build" / "transformers-tests")
)


def import_transformers_tests(*module_names: str) -> list:
    """Imports `transformers_tests.<name>` for each name, or skips the calling test module saying why they are not
    there (the download was impossible, or the fetch script has not run)."""
    import importlib

    unavailable = TRANSFORMERS_TESTS_DIR / "UNAVAILABLE"
    if unavailable.exists():
        pytest.skip(unavailable.read_text().strip(), allow_module_level=True)
    if not (TRANSFORMERS_TESTS_DIR / "COMPLETE").exists():
        pytest.skip(
            f"transformers' common tests are not in {TRANSFORMERS_TESTS_DIR}: run "
            "`python tests/fetch_transformers_tests.py` (make test does)",
            allow_module_level=True,
        )
    if str(TRANSFORMERS_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TRANSFORMERS_TESTS_DIR))
    return [importlib.import_module(f"transformers_tests.{name}") for name in module_names]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous between test processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_without_package(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where this repository's packages cannot be imported."""
    script = _BLOCK_PACKAGES % str(REPO_ROOT) + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated process failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result


@pytest.fixture
def tiny_beitv2_kwargs() -> dict:
    """A 4-layer, 32-wide BEiT v2 on 32 px images with 8 px patches (a 4x4 grid)."""
    return dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        vocab_size=64,
        early_layers=2,
    )


def read_metrics(output_dir: Path) -> list[dict]:
    """The records a pretraining script wrote to its `metrics.jsonl`, one per line."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def reset_accelerator_state() -> None:
    """Reset Accelerate's process-wide state, so the next in-process script run starts clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerator_state():
    """Reset Accelerate's process-wide state before and after the test, so each in-process script run starts clean."""
    reset_accelerator_state()
    yield
    reset_accelerator_state()


@pytest.fixture
def compile_without_inductor(monkeypatch):
    """`torch.compile` with the `aot_eager` backend: Dynamo and AOTAutograd still trace the whole graph (graph breaks,
    syncs and numerics show), but Inductor's code generation, which takes minutes on 2 CPU cores, is skipped."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


# ---------------------------------------------------------------------------------------------------------------
# Tiny inputs and command lines of the pretraining scripts (run_mim.py, run_vqkd.py).

TINY_BACKBONE = (
    "hidden_size=32,num_attention_heads=2,intermediate_size=64,num_hidden_layers=2,early_layers=1,head_layers=1"
)
VIT_TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)
TINY_TOKENIZER = "hidden_size=32,num_attention_heads=2,intermediate_size=64,num_hidden_layers=2,codebook_size=32"
HF_IMAGE_SCHEMA = {
    "huggingface": '{"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "Value", "dtype": "int64"}}}}'
}


def png_bytes(value: int, size=(6, 5), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_table(indices: range, corrupt: tuple[int, ...] = (), index_labels: bool = False) -> pa.Table:
    """Images whose pixel value is their index (truncated bytes for the ``corrupt`` ones), with HF Image metadata and
    an int `label` column: the row number, or the image index with `index_labels`."""
    images = [{"bytes": png_bytes(i)[:20] if i in corrupt else png_bytes(i), "path": f"{i}.png"} for i in indices]
    labels = list(indices) if index_labels else list(range(len(images)))
    return pa.table({"image": images, "label": labels}).replace_schema_metadata(HF_IMAGE_SCHEMA)


def write_parquet_shards(
    folder: Path,
    num_images: int,
    num_shards: int,
    corrupt: tuple[int, ...] = (),
    row_group_size: int | None = None,
    index_labels: bool = False,
) -> list[str]:
    """`num_images` distinct images (the pixel value is the index) in `num_shards` parquet files, each one row group
    unless `row_group_size` is given (`corrupt` and `index_labels` as in `image_table`)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    per_shard = num_images // num_shards
    for shard in range(num_shards):
        path = folder / f"train-{shard:02d}.parquet"
        pq.write_table(
            image_table(range(shard * per_shard, (shard + 1) * per_shard), corrupt, index_labels),
            path,
            row_group_size=row_group_size,
        )
        files.append(str(path))
    return files


def make_image_folder(root: Path, num_images: int = 10, corrupt: bool = True, rgba: bool = True) -> Path:
    """Random 40x48 images in an imagefolder layout, and (optionally) one RGBA image and one truncated PNG."""
    folder = root / "train" / "things"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(num_images):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    if rgba:
        PIL.Image.new("RGBA", (36, 36), (10, 200, 30, 128)).save(folder / "rgba.png")
    if corrupt:
        (folder / "truncated.png").write_bytes(png_bytes(1, size=(32, 32))[:30])
    return root


def make_vqkd_tokenizer(path: Path, seed: int = 0, codebook_size: int = 32) -> Path:
    """A randomly initialised 32 px / patch 8 VQ-KD tokenizer (4x4 grid; labels only need to be deterministic); its
    codebook is random unit vectors, as a tokenizer waiting for its k-means init refuses to tokenize. Other seeds give
    other weights of the same shape."""
    from modeling_beitv2 import VQKDConfig, VQKDModel
    from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

    torch.manual_seed(seed)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, **VIT_TINY),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, **VIT_TINY),
        codebook_size=codebook_size,
        teacher_dim=16,
        kmeans_init=False,
    )
    VQKDModel(config).save_pretrained(path)
    return path


def make_teacher(path: Path, patch_size: int = 8, hidden_size: int = 16, seed: int = 0) -> Path:
    """A random 32 px ViT teacher for run_vqkd.py; other seeds give other weights of the same shape."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    ViTModel(config).save_pretrained(path)
    return path


def mim_args(files: list[str], tokenizer: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer_name_or_path", str(tokenizer),
        "--config_name", "tiny",
        "--config_overrides", TINY_BACKBONE + ",patch_size=8",
        "--image_size", "32",
        "--data_files", *files,
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--shuffle_buffer_size", "5",
        *extra,
    ]  # fmt: skip


def vqkd_args(images: Path, teacher: Path, output_dir: Path, *extra: str, warmup_steps: int = 2) -> list[str]:
    return [
        "--teacher_name_or_path", str(teacher),
        "--config_name", "tiny",
        "--config_overrides", TINY_TOKENIZER + ",decoder.num_hidden_layers=1",
        "--image_size", "32",
        "--train_dir", str(images),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "3",
        "--learning_rate", "1e-3",
        "--warmup_steps", str(warmup_steps),
        "--logging_steps", "1",
        "--shuffle_buffer_size", "4",
        *extra,
    ]  # fmt: skip
