"""examples/plots.py: the matplotlib figures have the documented pixel sizes, images are drawn at their own
resolution, and bad input is refused by name."""

import numpy as np
import pytest
from PIL import Image

from pretraining.plots import (
    GRID_CAPTION_HEIGHT,
    GRID_HEADER_HEIGHT,
    LinePanel,
    bar_chart,
    captioned_image,
    image_grid,
    line_plot,
)


def size_of(path):
    with Image.open(path) as image:
        return image.size


def test_line_plot_panels_and_sizes(tmp_path):
    loss = LinePanel("loss", {"a": ([0, 10, 20], [3.0, 2.0, float("nan")]), "b": ([0, 10], [2.5, 1.0])},
                     reference_lines={"chance": 4.0})  # fmt: skip
    mse = LinePanel("mse", {"train": ([1, 2, 3], [0.1, 0.01, 0.0])}, log_y=True)  # 0 is left out on a log axis
    assert size_of(line_plot([loss, mse, loss], tmp_path / "row.png", panel_size=(300, 200))) == (900, 200)
    assert size_of(line_plot([loss, mse, loss], tmp_path / "grid.png", panel_size=(300, 200), columns=2)) == (600, 400)
    assert size_of(line_plot(loss, tmp_path / "one.png", title="t")) == (560, 400)

    with pytest.raises(ValueError, match="Series 'a' has 3 x values but 2 y values"):
        line_plot(LinePanel("bad", {"a": ([0, 1, 2], [1.0, 2.0])}), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="panel 'empty' got no points"):
        line_plot(LinePanel("empty", {"a": ([], [])}), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="columns must be at least 1"):
        line_plot(loss, tmp_path / "bad.png", columns=0)


def test_bar_chart(tmp_path):
    assert size_of(bar_chart([5, 3, 0, 0], tmp_path / "bars.png", "usage", size=(320, 240))) == (320, 240)
    with pytest.raises(ValueError, match="got no values"):
        bar_chart([], tmp_path / "bars.png", "usage")


def test_captioned_image_keeps_every_pixel(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = captioned_image(image, tmp_path / "cap.png", "code 3: 12 patches\nstripes 50%", caption_height=30)
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert drawn.shape == (80, 70, 3)
    np.testing.assert_array_equal(drawn[30:], image)
    assert (drawn[:30] != 255).any()  # the caption was written


def test_image_grid_layout(tmp_path):
    panel = np.linspace(0, 1, 16 * 16 * 3).reshape(16, 16, 3)  # float in [0, 1]
    rows = [[panel, (panel * 255).astype(np.uint8)] for _ in range(3)]
    path = image_grid(
        rows, tmp_path / "grid.png", ["a", "b\nsecond line"], ["r0", "r1", "r2"], title="t", panel_size=40
    )
    assert size_of(path) == (2 * 40, GRID_HEADER_HEIGHT + 3 * (GRID_CAPTION_HEIGHT + 40))
    assert size_of(image_grid(rows, tmp_path / "plain.png", ["a", "b"], panel_size=40)) == (
        80,
        GRID_HEADER_HEIGHT + 120,
    )

    with pytest.raises(ValueError, match="Every row must hold 3 images"):
        image_grid(rows, tmp_path / "bad.png", ["a", "b", "c"])
    with pytest.raises(ValueError, match="Got 1 row captions for 3 rows"):
        image_grid(rows, tmp_path / "bad.png", ["a", "b"], ["r0"])
    with pytest.raises(ValueError, match=r"Expected an \(height, width, 3\) image"):
        image_grid([[panel[..., 0], panel]], tmp_path / "bad.png", ["a", "b"])
