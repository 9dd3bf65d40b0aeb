"""The demo's scale (image and patch size, network width, codebook size, steps per stage) and its output folder.

    size = SIZES["quick"]                                    # DemoSize(train_images_per_class=60, ...)
    paths = DemoPaths.prepare(Path("demo_output"))           # empty, or cleared of an earlier demo run
    paths.vqkd, paths.mim_beitv2, paths.logs                 # demo_output/vqkd, ...

Every network of the demo is a ViT of width `WIDTH` on `IMAGE_SIZE` px images cut into `PATCH_SIZE` px patches (a
4x4 grid), and every tokenizer has `NUM_CODES` codes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

IMAGE_SIZE, PATCH_SIZE = 32, 8
# One tiny ViT width for every network of the demo.
WIDTH: dict[str, Any] = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)
NUM_CODES = 64
BATCH_SIZE = 32


@dataclass(frozen=True)
class DemoSize:
    """How much data and how many steps each stage gets."""

    train_images_per_class: int
    eval_images_per_class: int
    teacher_steps: int
    vqkd_steps: int
    mim_steps: int
    pixel_decoder_steps: int
    probe_epochs: int
    fine_tuning_steps: int


SIZES = {
    "full": DemoSize(
        train_images_per_class=150, eval_images_per_class=50, teacher_steps=1000, vqkd_steps=800, mim_steps=1500,
        pixel_decoder_steps=600, probe_epochs=90, fine_tuning_steps=300,
    ),
    "quick": DemoSize(
        train_images_per_class=60, eval_images_per_class=30, teacher_steps=400, vqkd_steps=300, mim_steps=400,
        pixel_decoder_steps=200, probe_epochs=60, fine_tuning_steps=100,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes: one folder per field, named as the field, under `root`."""

    root: Path
    logs: Path  # the output of every subprocess
    data: Path  # the generated dataset, its splits and the showcase images
    teacher: Path
    vqkd: Path
    dvae_random_init: Path  # BEiT v1-style MIM's tokenizer
    mim_beitv2: Path
    mim_beit_v1_style: Path
    pixel_decoder: Path
    random_init: Path  # the untrained backbone the probes compare against
    codebook: Path  # visualize_codebook.py's output
    probe: Path  # one folder per probed backbone
    fine_tuning: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        """The layout under `root` (nothing is created)."""
        return cls(root, **{name: root / name for name in DEMO_FOLDERS})

    @classmethod
    def prepare(cls, root: Path) -> DemoPaths:
        """The layout under `root`, after :func:`prepare_output_dir`."""
        return cls.under(prepare_output_dir(root))

    @property
    def mim(self) -> dict[str, Path]:
        """The two masked-image-modeling runs, by the name the results use."""
        return {"beitv2": self.mim_beitv2, "beit_v1_style": self.mim_beit_v1_style}

    @property
    def backbones(self) -> dict[str, Path]:
        """The backbones the linear probe and k-NN compare, by name (their results go to `probe / name`)."""
        return {**self.mim, "random_init": self.random_init}


# Everything a run writes directly under its output folder: the folders of `DemoPaths`, the files below and the marker.
DEMO_FOLDERS: tuple[str, ...] = tuple(field.name for field in fields(DemoPaths) if field.name != "root")
DEMO_FILES = (
    "results.json",
    "results.md",
    "loss_curves.png",
    "reconstructions.png",
    "mim_predictions.png",
    "mim_predictions_beit_v1.png",
)
DEMO_MARKER = ".beitv2-demo"


def prepare_output_dir(output: Path) -> Path:
    """An empty folder, or one an earlier demo run wrote (it holds `DEMO_MARKER`), cleared of that run's folders.

    Every run starts afresh: the training scripts refuse to start over next to an earlier run's checkpoints, and
    stale results must not mix with new ones. Any other non-empty folder is refused rather than cleaned.
    """
    if output.exists() and any(output.iterdir()) and not (output / DEMO_MARKER).exists():
        raise ValueError(f"{output} is not empty and was not written by the demo; choose another --output_dir.")
    for name in DEMO_FOLDERS:
        shutil.rmtree(output / name, ignore_errors=True)
    for name in DEMO_FILES:
        (output / name).unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARKER).touch()
    return output
