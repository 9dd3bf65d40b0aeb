#!/usr/bin/env python
"""Show what the codes of a visual tokenizer mean: the image patches assigned to each code (BEiT v2, Figure 4).

Tokenizes a set of images with a VQ-KD tokenizer (or the DALL-E dVAE), groups the patches by code, and writes:

- `code_{id}.png`: a grid of up to `--patches_per_code` patches assigned to that code, for the `--top_k` most used
  codes or for the codes given with `--codes`, under a caption with the code id, how many patches it received and,
  where the images have labels, the classes most of those patches come from;
- `usage_histogram.png`: how many patches each code received, codes sorted by usage;
- `codebook_usage.json`: the counts of every code, the fraction of the codebook used, the perplexity, and for each
  drawn code where its patches come from (`[image_index, row, column]`, in grid order, row-major) and, with labels,
  its most frequent classes (`[class, patches]`).

Labels exist for an image folder in the imagefolder layout (`root/class_name/image.png`): the class is the image's
folder under the split. Other sources are read without labels.

Each image is seen the way the tokenizer sees it at evaluation: the central square resized to the tokenizer's
input size (bicubic for VQ-KD, lanczos for the dVAE), as [0, 1] pixels that the tokenizer maps to its own input
range. The patches drawn are cells of that resized view (`image_size / grid` pixels per side).

    python examples/visualize_codebook.py --tokenizer_name_or_path path/to/vqkd \\
        --dataset_name ILSVRC/imagenet-1k --dataset_split validation --max_images 5000 \\
        --top_k 16 --output_dir codebook-vis
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import HfArgumentParser

from modeling_beitv2 import DVAEModel
from pretraining.data import decode_or_skip, list_image_files, load_image_stream, new_decode_counts
from pretraining.loop import VisualTokenizer, load_visual_tokenizer
from pretraining.plots import bar_chart, captioned_image
from processing.transforms import center_square_box

logger = logging.getLogger(__name__)


@dataclass
class VisualizeArguments:
    tokenizer_name_or_path: str = field(metadata={"help": "A VQ-KD tokenizer or a dVAE (name or path)."})
    output_dir: str = field(metadata={"help": "Where the grids, the histogram and codebook_usage.json go."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset or a local datasets folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (imagefolder layout)."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local .parquet / webdataset .tar files."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    image_column_name: str | None = field(default=None, metadata={"help": "Defaults to the first Image feature."})
    max_images: int = field(default=1000, metadata={"help": "Tokenize the first this many images of the stream."})
    codes: list[int] | None = field(default=None, metadata={"help": "Codes to draw (default: the --top_k most used)."})
    top_k: int = field(default=16, metadata={"help": "Draw the this many most used codes when --codes is not given."})
    patches_per_code: int = field(default=64, metadata={"help": "Patches per grid (fewer if a code has fewer)."})
    patch_display_size: int = field(
        default=32, metadata={"help": "Side in pixels of each patch in the grids (nearest-neighbour upscaling)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images per tokenizer forward pass."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device."})


GRID_PADDING = 2  # pixels of white between patches and around the grid
CAPTION_HEIGHT = 40  # pixels of the caption strip above each code's grid
CAPTION_CLASSES = 3  # most frequent classes named in a caption (and in codebook_usage.json)


@dataclass
class CodebookUsage:
    """What tokenizing a set of images produced.

    Args:
        views (`np.ndarray` of shape `(num_images, image_size, image_size, 3)`, uint8): the tokenizer's view of each
            image, before the pixel mapping.
        indices (`np.ndarray` of shape `(num_images, rows, columns)`, int64): the code of every patch.
        num_codes (`int`): size of the codebook.
        labels (`np.ndarray` of shape `(num_images,)`, int64, *optional*): class of each image, an index into
            `class_names`.
        class_names (`list[str]`, *optional*): names of the classes, with `labels`.
    """

    views: np.ndarray
    indices: np.ndarray
    num_codes: int
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if (self.labels is None) != (self.class_names is None):
            raise ValueError("Give both labels and class_names, or neither.")
        if self.labels is not None and len(self.labels) != len(self.indices):
            raise ValueError(f"Got {len(self.labels)} labels for {len(self.indices)} images.")

    @property
    def counts(self) -> np.ndarray:
        """`(num_codes,)` number of patches assigned to each code."""
        return np.bincount(self.indices.reshape(-1), minlength=self.num_codes)

    @property
    def usage_fraction(self) -> float:
        """Fraction of the codebook assigned to at least one patch."""
        return float((self.counts > 0).mean())

    @property
    def perplexity(self) -> float:
        """`exp(entropy)` of the code histogram: the number of equally used codes it is worth."""
        probabilities = self.counts / max(1, self.counts.sum())
        probabilities = probabilities[probabilities > 0]
        return float(np.exp(-(probabilities * np.log(probabilities)).sum()))

    @property
    def cell_size(self) -> int:
        """Side in pixels of one patch in the tokenizer's view."""
        return self.views.shape[1] // self.indices.shape[1]

    def patch(self, image_index: int, row: int, column: int) -> np.ndarray:
        """`(cell, cell, 3)` uint8 pixels of one patch of the tokenizer's view."""
        cell = self.cell_size
        return self.views[image_index, row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]

    def top_classes(self, code: int, limit: int = CAPTION_CLASSES) -> list[tuple[str, int]]:
        """Up to `limit` `(class name, number of patches)` of the classes whose images hold the most patches with
        this code, most first (ties by class index); empty without labels."""
        if self.labels is None or self.class_names is None:  # both or neither (`__post_init__`)
            return []
        images = np.nonzero(self.indices == code)[0]  # one entry per patch
        counts = np.bincount(self.labels[images], minlength=len(self.class_names))
        order = np.lexsort((np.arange(len(counts)), -counts))
        return [(self.class_names[label], int(counts[label])) for label in order[:limit] if counts[label] > 0]

    def locations(self, code: int, limit: int) -> list[tuple[int, int, int]]:
        """Up to `limit` `(image_index, row, column)` of patches with this code, spread over as many images as
        possible: the first patch of each image in turn, then the second, and so on."""
        found = np.argwhere(self.indices == code)  # sorted by image, then row, then column
        if len(found) == 0:
            return []
        images, first = np.unique(found[:, 0], return_index=True)
        rank_in_image = np.arange(len(found)) - np.repeat(first, np.diff(np.append(first, len(found))))
        order = np.lexsort((found[:, 0], rank_in_image))
        return [(int(image), int(row), int(column)) for image, row, column in found[order[:limit]]]


def tokenizer_view(image: PIL.Image.Image, tokenizer: VisualTokenizer) -> np.ndarray:
    """The central square resized to the tokenizer's input size: `(size, size, 3)` uint8."""
    size = tokenizer.image_size
    top, left, side, _ = center_square_box(*image.size)
    resample = PIL.Image.Resampling.LANCZOS if isinstance(tokenizer, DVAEModel) else PIL.Image.Resampling.BICUBIC
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), resample))


@torch.no_grad()
def tokenize_views(
    tokenizer: VisualTokenizer, views: np.ndarray, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """`(N, size, size, 3)` uint8 views -> codes `(N, rows, columns)` int64."""
    rows, columns = tokenizer.patch_grid
    codes = []
    for start in range(0, len(views), batch_size):
        pixels = torch.from_numpy(views[start : start + batch_size]).permute(0, 3, 1, 2).float().div(255).to(device)
        codes.append(tokenizer.get_codebook_indices(pixels).cpu().view(-1, rows, columns))
    return torch.cat(codes).numpy()


def folder_classes(train_dir: str, split: str) -> str | None:
    """The split folder of an image folder whose images all lie in class folders below it, else None."""
    files = list_image_files(train_dir, split)
    if len(files) < 2:
        return None
    root = os.path.commonpath(files)
    return root if all(os.path.dirname(path) != root for path in files) else None


def read_images(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    max_images: int,
) -> tuple[list[PIL.Image.Image], list[str] | None]:
    """The first `max_images` decodable images of the chosen source, streamed through `datasets`, and their
    classes (the name of the class folder) when the source is an image folder of class folders, else None."""
    dataset, image_column = load_image_stream(
        dataset_name, dataset_config_name, train_dir, data_files, split=split, image_column_name=image_column_name
    )
    class_root = folder_classes(train_dir, split) if train_dir else None
    images, labels, counts = [], [], new_decode_counts()
    for example in dataset:
        value = example[image_column]
        image = decode_or_skip(value, counts)
        if image is None:
            continue
        images.append(image)
        if class_root is not None:
            labels.append(os.path.relpath(value["path"], class_root).split(os.sep)[0])
        if len(images) == max_images:
            break
    if not images:
        raise ValueError("The image source yielded no decodable image.")
    return images, labels if class_root is not None else None


def code_grid(usage: CodebookUsage, locations: list[tuple[int, int, int]], columns: int, display: int) -> np.ndarray:
    """The patches at `locations`, upscaled to `display` pixels, row-major in a grid `columns` wide."""
    rows = max(1, math.ceil(len(locations) / columns))
    step = display + GRID_PADDING
    grid = np.full((GRID_PADDING + rows * step, GRID_PADDING + columns * step, 3), 255, dtype=np.uint8)
    for position, location in enumerate(locations):
        patch = PIL.Image.fromarray(usage.patch(*location)).resize((display, display), PIL.Image.Resampling.NEAREST)
        top = GRID_PADDING + (position // columns) * step
        left = GRID_PADDING + (position % columns) * step
        grid[top : top + display, left : left + display] = np.asarray(patch)
    return grid


def choose_codes(usage: CodebookUsage, codes: list[int] | None, top_k: int) -> list[int]:
    if codes:
        bad = [code for code in codes if not 0 <= code < usage.num_codes]
        if bad:
            raise ValueError(f"--codes {bad} are outside the codebook [0, {usage.num_codes - 1}].")
        return list(codes)
    if top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {top_k}.")
    counts = usage.counts
    # Most used first; ties by code id, so the choice is deterministic.
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(code) for code in order[:top_k] if counts[code] > 0]


def code_caption(code: int, count: int, top_classes: list[tuple[str, int]]) -> str:
    """`code 12: 345 patches`, and a second line `stripes 60%, dots 25%` (shares of the code's patches) with labels."""
    caption = f"code {code}: {count} patch{'es' if count != 1 else ''}"
    if top_classes:
        caption += "\n" + ", ".join(f"{name} {patches / count:.0%}" for name, patches in top_classes)
    return caption


def write_visualization(
    usage: CodebookUsage,
    output_dir: str | Path,
    *,
    tokenizer_name: str,
    codes: list[int] | None,
    top_k: int,
    patches_per_code: int,
    patch_display_size: int,
) -> dict:
    """Write the grids, the histogram and `codebook_usage.json` into `output_dir`; return the JSON content."""
    if patches_per_code < 1:
        raise ValueError(f"--patches_per_code must be at least 1, got {patches_per_code}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = usage.counts
    columns = math.ceil(math.sqrt(patches_per_code))
    drawn = {}
    for code in choose_codes(usage, codes, top_k):
        locations = usage.locations(code, patches_per_code)
        if not locations:
            logger.warning("Code %d was assigned to no patch of these images; no grid written.", code)
            continue
        grid = code_grid(usage, locations, columns, patch_display_size)
        top_classes = usage.top_classes(code)
        caption = code_caption(code, int(counts[code]), top_classes)
        captioned_image(grid, output_dir / f"code_{code}.png", caption, caption_height=CAPTION_HEIGHT)
        drawn[str(code)] = {"count": int(counts[code]), "patches": [list(location) for location in locations]}
        if usage.labels is not None:
            drawn[str(code)]["top_classes"] = [list(entry) for entry in top_classes]
    bar_chart(
        sorted(counts.tolist(), reverse=True),
        output_dir / "usage_histogram.png",
        title=f"Codebook usage: {int((counts > 0).sum())}/{usage.num_codes} codes used, "
        f"perplexity {usage.perplexity:.1f}",
        x_label="codes sorted by usage",
        y_label="patches",
    )
    summary = {
        "tokenizer": tokenizer_name,
        "num_images": int(usage.indices.shape[0]),
        "num_patches": int(usage.indices.size),
        "num_codes": usage.num_codes,
        "codes_used": int((counts > 0).sum()),
        "usage_fraction": usage.usage_fraction,
        "perplexity": usage.perplexity,
        "grid_columns": columns,
        "patch_display_size": patch_display_size,
        "labelled": usage.labels is not None,
        "counts": counts.tolist(),
        "drawn_codes": drawn,
    }
    (output_dir / "codebook_usage.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    # transformers types the dataclasses as `DataClassType`, a NewType that no class is an instance of.
    (args,) = HfArgumentParser(VisualizeArguments).parse_args_into_dataclasses(  # type: ignore[arg-type]
        args=sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    tokenizer = load_visual_tokenizer(args.tokenizer_name_or_path).to(args.device)
    images, classes = read_images(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        data_files=args.data_files,
        split=args.dataset_split,
        image_column_name=args.image_column_name,
        max_images=args.max_images,
    )
    views = np.stack([tokenizer_view(image, tokenizer) for image in images])
    num_codes = tokenizer.codebook_size
    class_names = labels = None
    if classes is not None:
        class_names = sorted(set(classes))
        class_index = {name: index for index, name in enumerate(class_names)}
        labels = np.asarray([class_index[name] for name in classes])
    codes = tokenize_views(tokenizer, views, args.batch_size, args.device)
    usage = CodebookUsage(views, codes, num_codes, labels, class_names)
    summary = write_visualization(
        usage,
        args.output_dir,
        tokenizer_name=args.tokenizer_name_or_path,
        codes=args.codes,
        top_k=args.top_k,
        patches_per_code=args.patches_per_code,
        patch_display_size=args.patch_display_size,
    )
    logger.info(
        "%d images, %d/%d codes used (%.1f%%), perplexity %.1f; wrote %d grids to %s",
        summary["num_images"],
        summary["codes_used"],
        num_codes,
        100 * summary["usage_fraction"],
        summary["perplexity"],
        len(summary["drawn_codes"]),
        args.output_dir,
    )
    return summary


if __name__ == "__main__":
    main()
