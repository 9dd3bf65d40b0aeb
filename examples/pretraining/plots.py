"""Figures of the demo and the visualisation scripts, drawn with matplotlib (`pip install -e ".[plots]"`).

Every function builds a `matplotlib.figure.Figure` directly and writes it with the Agg canvas: no pyplot, so no
global figure state and no GUI backend, which keeps the functions safe in scripts, tests and worker processes.
Sizes are in pixels at `DPI` and exact (no tight bounding box), so that a caller knows the size of what it writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError as error:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        'The figures need matplotlib: pip install -e ".[plots]" (or pip install matplotlib).', name="matplotlib"
    ) from error

DPI = 100
FONT_SIZE = 10
TITLE_SIZE = 11
GRID_HEADER_HEIGHT = 72  # pixels above the panels of `image_grid`: its title and column titles
GRID_CAPTION_HEIGHT = 24  # pixels of the caption strip above each row of `image_grid`


@dataclass
class LinePanel:
    """One axes of :func:`line_plot`: `series` maps a legend label to `(xs, ys)`; non-finite ys are left out."""

    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    x_label: str = "step"
    y_label: str = ""
    log_y: bool = False
    # Horizontal dashed lines, `{legend label: y}` (e.g. the loss of a uniform guess).
    reference_lines: dict[str, float] = field(default_factory=dict)


def _new_figure(width_px: int, height_px: int) -> Figure:
    if width_px < 1 or height_px < 1:
        raise ValueError(f"A figure needs a positive size in pixels, got {width_px} x {height_px}.")
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays the one asked for
    return path


def _check_series(name: str, xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"Series {name!r} has {x.size} x values but {y.size} y values.")
    finite = np.isfinite(y)
    return x[finite], y[finite]


def line_plot(
    panels: LinePanel | Sequence[LinePanel],
    path: str | Path,
    title: str | None = None,
    panel_size: tuple[int, int] = (560, 400),
    columns: int | None = None,
) -> Path:
    """Draw one or more line panels, `columns` to a row (default: all in one row), and save a PNG of
    `columns * panel_size[0]` by `rows * panel_size[1]` pixels at `path`.

    Each panel has its own y axis, so quantities of different scales (a cosine distance and a cross-entropy) are
    shown as they are, not normalised. Ticks are round numbers (`MaxNLocator`); `log_y` panels use a log scale,
    which only holds positive values.
    """
    panels = [panels] if isinstance(panels, LinePanel) else list(panels)
    if not panels:
        raise ValueError("line_plot got no panel to draw.")
    columns = len(panels) if columns is None else columns
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}.")
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(panel_size[0] * columns, panel_size[1] * rows)
    figure.set_layout_engine("constrained")
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels, strict=False):
        drawn = 0
        for name, (xs, ys) in panel.series.items():
            x, y = _check_series(name, xs, ys)
            if panel.log_y:
                x, y = x[y > 0], y[y > 0]
            if x.size == 0:
                continue
            ax.plot(x, y, label=name, linewidth=1.6, marker="o" if x.size < 30 else None, markersize=3)
            drawn += 1
        if not drawn:
            raise ValueError(f"line_plot panel {panel.title!r} got no points to draw.")
        for name, level in panel.reference_lines.items():
            ax.axhline(level, color="0.4", linestyle="--", linewidth=1.0, label=name)
        if panel.log_y:
            ax.set_yscale("log")
        else:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_title(panel.title, fontsize=TITLE_SIZE)
        ax.set_xlabel(panel.x_label, fontsize=FONT_SIZE)
        ax.set_ylabel(panel.y_label, fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE - 1)
        ax.grid(True, which="major", alpha=0.3)
        # An opaque legend stays readable where it has to cover a curve.
        ax.legend(fontsize=FONT_SIZE - 1, framealpha=0.9, edgecolor="none")
    if title:
        figure.suptitle(title, fontsize=TITLE_SIZE + 1)
    return _save(figure, path)


def bar_chart(
    values: Sequence[float],
    path: str | Path,
    title: str,
    x_label: str = "",
    y_label: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw one bar per value (left to right, in the given order) and save a PNG of `size` pixels at `path`.

    Bars touch (width 1) so that thousands of them (a codebook's usage, sorted) read as a filled curve.
    """
    heights = np.asarray(values, dtype=float)
    if heights.size == 0:
        raise ValueError(f"bar_chart({title!r}) got no values.")
    figure = _new_figure(*size)
    figure.set_layout_engine("constrained")
    ax = figure.subplots()
    ax.bar(np.arange(heights.size), heights, width=1.0, align="edge", linewidth=0, color="tab:blue")
    ax.set_xlim(0, heights.size)
    if log_y and (heights > 0).any():
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xlabel(x_label, fontsize=FONT_SIZE)
    ax.set_ylabel(y_label, fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8, or float in [0, 1] (clipped), -> uint8."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Expected an (height, width, 3) image, got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def captioned_image(image: np.ndarray, path: str | Path, caption: str, caption_height: int = 48) -> Path:
    """Save `image` at its own resolution (one image pixel = one PNG pixel) under a caption strip of
    `caption_height` pixels: the PNG is `(H + caption_height, W)` pixels, the image in its bottom `H` rows.

    The caption's font shrinks with narrow images so that it fits; long captions wrap on `\\n`.
    """
    image = _as_uint8(image)
    height, width = image.shape[:2]
    figure = _new_figure(width, height + caption_height)
    ax = figure.add_axes((0.0, 0.0, 1.0, height / (height + caption_height)))
    ax.imshow(image, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    lines = caption.split("\n")
    # Points per line that fit the strip's height, and the width of the longest line (about 0.6 em per character).
    size = min(FONT_SIZE + 1, 0.75 * caption_height / len(lines) * 72 / DPI)
    size = min(size, width / max(len(line) for line in lines) / 0.6 * 72 / DPI)
    figure.text(0.5, 1 - 0.5 * caption_height / (height + caption_height), caption, ha="center", va="center",
                fontsize=max(size, 4), linespacing=1.1)  # fmt: skip
    return _save(figure, path)


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    column_titles: Sequence[str],
    row_captions: Sequence[str] | None = None,
    title: str | None = None,
    panel_size: int = 160,
    header_height: int = GRID_HEADER_HEIGHT,
    caption_height: int = GRID_CAPTION_HEIGHT,
) -> Path:
    """Save a grid of images: `rows[i][j]` in row `i`, column `j` (each `(H, W, 3)`, uint8 or float in [0, 1],
    shown nearest-neighbour in a `panel_size` pixel square).

    Layout, in pixels: a `header_height` strip (the `title`, wrapped to the width, above the `column_titles`, which
    may hold one line break), then per row a
    `caption_height` strip (its `row_captions` entry, if given) above `panel_size` of images. The PNG is
    `len(column_titles) * panel_size` wide and `header_height + len(rows) * (caption_height + panel_size)` tall.
    """
    num_columns = len(column_titles)
    if not rows or num_columns == 0:
        raise ValueError("image_grid needs at least one row and one column.")
    if any(len(row) != num_columns for row in rows):
        raise ValueError(f"Every row must hold {num_columns} images (one per column title).")
    if row_captions is not None and len(row_captions) != len(rows):
        raise ValueError(f"Got {len(row_captions)} row captions for {len(rows)} rows.")
    if row_captions is None:
        caption_height = 0
    width = num_columns * panel_size
    height = header_height + len(rows) * (caption_height + panel_size)
    figure = _new_figure(width, height)
    font = max(6.0, min(FONT_SIZE, panel_size / 16))
    for column, name in enumerate(column_titles):
        figure.text((column + 0.5) / num_columns, 1 - (header_height - 4) / height, name, ha="center", va="bottom",
                    fontsize=font, fontweight="bold")  # fmt: skip
    if title:
        figure.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=font, wrap=True)
    for row_index, images in enumerate(rows):
        top = header_height + row_index * (caption_height + panel_size)
        if row_captions is not None:
            figure.text(0.5, 1 - (top + caption_height / 2) / height, row_captions[row_index], ha="center",
                        va="center", fontsize=font)  # fmt: skip
        bottom = height - (top + caption_height + panel_size)
        for column, image in enumerate(images):
            ax = figure.add_axes((column / num_columns, bottom / height, 1 / num_columns, panel_size / height))
            ax.imshow(_as_uint8(image), interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("white")
                spine.set_linewidth(2)
    return _save(figure, path)
