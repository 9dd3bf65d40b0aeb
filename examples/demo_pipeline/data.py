"""The demo's dataset: small images of periodic patterns, one class per pattern, written as class folders.

Each image is filled edge to edge with one pattern (so that any random crop still shows it) drawn with a random
foreground and background colour, frequency, phase, orientation jitter and pixel noise. The class is the pattern's
geometry; colour, scale and phase are nuisances that a useful representation has to ignore, which makes the task
hard for features that mostly encode colour (such as those of a randomly initialised network) and easy for a
model trained with the labels.

    write_demo_dataset("demo_output/data", {"train": 100, "validation": 50}, image_size=32)
    # demo_output/data/train/{stripes_horizontal,...}/00000.png, demo_output/data/validation/...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# Each pattern maps rotated coordinates (u, v) in "cycles" (one unit = one period) to a boolean foreground mask.
PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "stripes_horizontal": lambda u, v: np.sin(2 * np.pi * v) > 0,
    "stripes_vertical": lambda u, v: np.sin(2 * np.pi * u) > 0,
    "stripes_diagonal": lambda u, v: np.sin(2 * np.pi * (u + v) / np.sqrt(2)) > 0,
    "checkerboard": lambda u, v: np.sin(2 * np.pi * u) * np.sin(2 * np.pi * v) > 0,
    "dots": lambda u, v: np.cos(2 * np.pi * u) + np.cos(2 * np.pi * v) > 1.2,
    "grid_lines": lambda u, v: (np.abs(np.sin(2 * np.pi * u)) < 0.35) | (np.abs(np.sin(2 * np.pi * v)) < 0.35),
}
CLASS_NAMES: tuple[str, ...] = tuple(PATTERNS)


def render_pattern(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One `(image_size, image_size, 3)` uint8 image of pattern `CLASS_NAMES[label]` with random nuisances."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must lie in [0, {len(CLASS_NAMES) - 1}], got {label}.")
    periods = rng.uniform(2.5, 5.0)  # periods across the image
    angle = rng.uniform(-0.2, 0.2)
    if CLASS_NAMES[label] == "stripes_diagonal" and rng.random() < 0.5:
        angle += np.pi / 2  # both diagonals, so that a horizontal flip stays in the class
    coordinates = (np.arange(image_size) + 0.5) / image_size * periods
    y, x = np.meshgrid(coordinates, coordinates, indexing="ij")
    u = np.cos(angle) * x + np.sin(angle) * y + rng.uniform(0, 1)
    v = -np.sin(angle) * x + np.cos(angle) * y + rng.uniform(0, 1)
    mask = PATTERNS[CLASS_NAMES[label]](u, v)
    foreground, background = rng.uniform(0, 255, size=(2, 3))
    # Keep the two colours apart so that the pattern is visible.
    while np.abs(foreground - background).sum() < 150:
        foreground, background = rng.uniform(0, 255, size=(2, 3))
    pixels = np.where(mask[..., None], foreground, background) + rng.normal(0, 12, size=(image_size, image_size, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def write_demo_dataset(
    root: str | Path, images_per_class: dict[str, int], image_size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """Write `images_per_class[split]` PNGs per class under `root/split/class_name/`.

    Returns:
        The folder of each split (an imagefolder that `datasets` streams with `load_dataset("imagefolder", ...)`).
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
    root = Path(root)
    folders = {}
    for split_index, (split, count) in enumerate(images_per_class.items()):
        if count < 1:
            raise ValueError(f"Every split needs at least one image per class; got {count} for {split!r}.")
        rng = np.random.default_rng([seed, split_index])
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(render_pattern(label, image_size, rng)).save(folder / f"{index:05d}.png")
        folders[split] = root / split
    return folders


def load_labelled_images(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split written by :func:`write_demo_dataset`: `(uint8 (N, H, W, 3), int64 labels (N,))`."""
    images, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((Path(folder) / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    if not images:
        raise ValueError(f"No images of the classes {CLASS_NAMES} found under {folder}.")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_showcase(split_dir: str | Path, output_dir: str | Path, per_class: int = 1) -> list[Path]:
    """Copy the first `per_class` images of every class of a split into one flat folder, as
    `{label}_{class_name}_{index}.png`, so that a script reading the first N images of the folder (in sorted order)
    shows every class in turn.

    Returns:
        The written files, in `CLASS_NAMES` order (their sorted order too, for at most 10 classes and 10 per class).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for label, name in enumerate(CLASS_NAMES):
        sources = sorted((Path(split_dir) / name).glob("*.png"))[:per_class]
        if not sources:
            raise ValueError(f"No images of class {name!r} under {split_dir}.")
        for index, source in enumerate(sources):
            target = output_dir / f"{label}_{name}_{index}.png"
            target.write_bytes(source.read_bytes())
            written.append(target)
    return written


def showcase_class(path: str | Path) -> str:
    """The class name of an image written by :func:`write_showcase`."""
    return CLASS_NAMES[int(Path(path).stem.split("_", 1)[0])]
