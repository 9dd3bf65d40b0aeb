"""Shared fixtures: tiny configs, a way to run code in a fresh Python process without this repo, and helpers for
running the pretraining scripts in process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

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


@pytest.fixture
def fresh_accelerator_state():
    """Reset Accelerate's process-wide state before and after the test, so each in-process script run starts clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def compile_without_inductor(monkeypatch):
    """`torch.compile` with the `aot_eager` backend: Dynamo and AOTAutograd still trace the whole graph (graph breaks,
    syncs and numerics show), but Inductor's code generation, which takes minutes on 2 CPU cores, is skipped."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
