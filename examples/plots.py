"""Line plots and bar charts drawn with PIL only, so that the demo and the codebook visualisation need no plotting
library (matplotlib is not a dependency of this project)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 70, 20, 40, 50


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _tick(value: float) -> str:
    return f"{value:.3g}"


def _frame(draw: ImageDraw.ImageDraw, size: tuple[int, int], title: str, x_label: str, y_label: str) -> None:
    width, height = size
    font = _font()
    draw.rectangle(
        [_MARGIN_LEFT, _MARGIN_TOP, width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM], outline=(0, 0, 0), width=1
    )
    draw.text((width // 2, 12), title, fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((width // 2, height - 14), x_label, fill=(0, 0, 0), font=font, anchor="mb")
    draw.text((6, _MARGIN_TOP - 20), y_label, fill=(0, 0, 0), font=font)


def _axis_ticks(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    num_ticks: int = 5,
) -> None:
    width, height = size
    font = _font()
    plot_width = width - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = height - _MARGIN_TOP - _MARGIN_BOTTOM
    for index in range(num_ticks + 1):
        fraction = index / num_ticks
        x = _MARGIN_LEFT + fraction * plot_width
        y = height - _MARGIN_BOTTOM - fraction * plot_height
        draw.line([x, height - _MARGIN_BOTTOM, x, height - _MARGIN_BOTTOM + 4], fill=(0, 0, 0))
        draw.text((x, height - _MARGIN_BOTTOM + 6), _tick(x_range[0] + fraction * (x_range[1] - x_range[0])),
                  fill=(0, 0, 0), font=font, anchor="mt")  # fmt: skip
        draw.line([_MARGIN_LEFT - 4, y, _MARGIN_LEFT, y], fill=(0, 0, 0))
        draw.text((_MARGIN_LEFT - 6, y), _tick(y_range[0] + fraction * (y_range[1] - y_range[0])),
                  fill=(0, 0, 0), font=font, anchor="rm")  # fmt: skip


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    x_label: str = "step",
    y_label: str = "",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw `{name: (xs, ys)}` as coloured lines with a legend and save a PNG at `path`."""
    series = {name: (list(xs), list(ys)) for name, (xs, ys) in series.items() if len(xs)}
    if not series:
        raise ValueError(f"line_plot({title!r}) got no points to draw.")
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"Series {name!r} has {len(xs)} x values but {len(ys)} y values.")
    all_x = [x for xs, _ in series.values() for x in xs]
    x_range = (min(all_x), max(all_x)) if max(all_x) > min(all_x) else _padded_range(all_x)
    y_range = _padded_range([y for _, ys in series.values() for y in ys if math.isfinite(y)])
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _frame(draw, size, title, x_label, y_label)
    _axis_ticks(draw, size, x_range, y_range)
    width, height = size
    plot_width = width - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = height - _MARGIN_TOP - _MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            _MARGIN_LEFT + (x - x_range[0]) / (x_range[1] - x_range[0]) * plot_width,
            height - _MARGIN_BOTTOM - (y - y_range[0]) / (y_range[1] - y_range[0]) * plot_height,
        )

    font = _font()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        points = [to_pixel(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) < 40 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        legend_y = _MARGIN_TOP + 8 + 14 * index
        draw.line([width - 190, legend_y, width - 170, legend_y], fill=color, width=3)
        draw.text((width - 165, legend_y), name, fill=(0, 0, 0), font=font, anchor="lm")
    path = Path(path)
    image.save(path)
    return path


def bar_chart(
    values: Sequence[float],
    path: str | Path,
    title: str,
    x_label: str = "",
    y_label: str = "",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw one bar per value (left to right, in the given order) and save a PNG at `path`."""
    values = list(values)
    if not values:
        raise ValueError(f"bar_chart({title!r}) got no values.")
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _frame(draw, size, title, x_label, y_label)
    top = max(max(values), 1e-12)
    _axis_ticks(draw, size, (0, len(values)), (0, top))
    width, height = size
    plot_width = width - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = height - _MARGIN_TOP - _MARGIN_BOTTOM
    bar_width = plot_width / len(values)
    for index, value in enumerate(values):
        left = _MARGIN_LEFT + index * bar_width
        bar_top = height - _MARGIN_BOTTOM - value / top * plot_height
        draw.rectangle(
            [left, bar_top, left + max(bar_width - 1, 1), height - _MARGIN_BOTTOM], fill=COLORS[0], outline=None
        )
    path = Path(path)
    image.save(path)
    return path
