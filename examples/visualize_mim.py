#!/usr/bin/env python
"""Show what a masked image model predicts: the codes it guesses for the masked patches, painted back into pixels.

For each of `--num_images` images, one row of four panels (one PNG for the whole set, `--output`):

1. **original**: the tokenizer's view of the image (the central square at the tokenizer's input size);
2. **masked input**: the same view with the masked patches greyed out: what the model sees;
3. **tokenizer codes**: the tokenizer's codes of every patch, rendered by the decoder (the best a perfect
   masked image model could show);
4. **prediction**: the same grid with the masked patches' codes replaced by the model's argmax predictions (the
   visible patches keep their codes), rendered the same way; its caption gives that image's masked-token accuracy.

The figure's title gives the masked-token accuracy over all the images. The PNG is `4 * --panel_size` pixels wide and
`plots.image_grid`'s header plus `--num_images * (caption + --panel_size)` pixels tall.

Renderers: BEiT v2 (a VQ-KD tokenizer) needs a pixel decoder trained for that tokenizer (`--decoder_name_or_path`,
see `run_pixel_decoder.py`), since VQ-KD codes are semantic and have no decoder to pixels of their own; BEiT v1's
DALL-E dVAE renders its codes itself (`DVAEModel.decode`).

The images go through the MIM model's saved image processor (`run_mim.py` saves it next to the model), on its
deterministic evaluation path (central square, no augmentation), with masks drawn by its mask generator from `--seed`,
so that a run is reproducible.

    python examples/visualize_mim.py --model_name_or_path beitv2-mim --tokenizer_name_or_path vqkd \\
        --decoder_name_or_path pixel-decoder --image_dir path/to/images --num_images 4 --output mim_predictions.png
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoModel, HfArgumentParser

from modeling_beitv2 import BeitV2ForMaskedImageModeling, DVAEModel, VQKDModel, VQKDPixelDecoder
from pretraining.arguments import square_side
from pretraining.data import decode_or_skip, load_image_stream, new_decode_counts
from pretraining.loop import VisualTokenizer, load_visual_tokenizer, load_with_flag
from pretraining.plots import image_grid
from processing import BeitV2ImageProcessor

logger = logging.getLogger(__name__)

COLUMN_TITLES = ("original", "masked input", "tokenizer codes", "prediction")
MASK_GREY = 0.5  # value of the masked patches in the "masked input" panel


@dataclass
class VisualizeMIMArguments:
    model_name_or_path: str = field(metadata={"help": "A BeitV2ForMaskedImageModeling folder (from run_mim.py)."})
    tokenizer_name_or_path: str = field(
        metadata={"help": "The model's tokenizer: a VQ-KD (BEiT v2) or a DALL-E dVAE (BEiT v1)."}
    )
    decoder_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A VQKDPixelDecoder for the VQ-KD tokenizer (run_pixel_decoder.py); not used with a dVAE."},
    )
    output: str = field(default="mim_predictions.png", metadata={"help": "Path of the PNG grid."})
    image_dir: str | None = field(default=None, metadata={"help": "A folder of images (imagefolder layout)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset or a local datasets folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local .parquet / webdataset .tar files."})
    dataset_split: str = field(default="validation", metadata={"help": "Split to read."})
    image_column_name: str | None = field(default=None, metadata={"help": "Defaults to the first Image feature."})
    num_images: int = field(default=4, metadata={"help": "The first this many decodable images: one row each."})
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of patches masked (default: the model's image processor's)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the masks."})
    panel_size: int = field(default=160, metadata={"help": "Side in pixels of each panel of the grid."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device."})

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"--num_images must be at least 1, got {self.num_images}.")
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        if self.panel_size < 16:
            raise ValueError(f"--panel_size must be at least 16 pixels, got {self.panel_size}.")


@dataclass
class MIMVisualization:
    """What :func:`visualize` computed and drew.

    Args:
        panels (`np.ndarray` of shape `(num_images, 4, size, size, 3)`, float in [0, 1]): the panels of the grid, in
            `COLUMN_TITLES` order, at the renderer's resolution.
        codes (`torch.LongTensor` of shape `(num_images, num_patches)`): the tokenizer's codes.
        predicted_codes (`torch.LongTensor` of shape `(num_images, num_patches)`): `codes` with the masked patches
            replaced by the model's predictions.
        bool_masked_pos (`torch.BoolTensor` of shape `(num_images, num_patches)`): the masks.
        accuracy (`float`): masked-token accuracy over all the images' masked patches.
        image_accuracies (`list[float]`): the same, per image.
        image_correct (`list[int]`): number of masked patches whose code was predicted right, per image.
    """

    panels: np.ndarray
    codes: torch.Tensor
    predicted_codes: torch.Tensor
    bool_masked_pos: torch.Tensor
    accuracy: float
    image_accuracies: list[float]
    image_correct: list[int]


def read_images(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_dir: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    num_images: int,
) -> list[PIL.Image.Image]:
    """The first `num_images` decodable images of the chosen source."""
    dataset, column = load_image_stream(
        dataset_name, dataset_config_name, image_dir, data_files, split=split, image_column_name=image_column_name
    )
    images, counts = [], new_decode_counts()
    for example in dataset:
        image = decode_or_skip(example[column], counts)
        if image is not None:
            images.append(image)
        if len(images) == num_images:
            break
    if not images:
        raise ValueError("The image source yielded no decodable image.")
    return images


# What paints codes as pixels: `decode(codes)` to `(batch, 3, image_size, image_size)` in [0, 1].
Renderer = DVAEModel | VQKDPixelDecoder


def load_renderer(tokenizer: VisualTokenizer, decoder_name_or_path: str | None) -> Renderer:
    """What paints codes: the dVAE itself, or the pixel decoder of a VQ-KD tokenizer (checked against it)."""
    if isinstance(tokenizer, DVAEModel):
        if decoder_name_or_path is not None:
            logger.warning("--decoder_name_or_path is ignored: the dVAE tokenizer renders its own codes.")
        return tokenizer
    if decoder_name_or_path is None:
        raise ValueError(
            "A VQ-KD tokenizer has no decoder to pixels: pass --decoder_name_or_path, a VQKDPixelDecoder trained for "
            "it with run_pixel_decoder.py."
        )
    decoder = load_with_flag(
        "--decoder_name_or_path", decoder_name_or_path, lambda: AutoModel.from_pretrained(decoder_name_or_path)
    )
    decoder = decoder.eval().requires_grad_(False)
    if not isinstance(decoder, VQKDPixelDecoder):
        tokenizer_note = (
            " (a tokenizer: its decode() predicts teacher features, not pixels)"
            if isinstance(decoder, (VQKDModel, DVAEModel))
            else ""
        )
        raise ValueError(
            f"--decoder_name_or_path {decoder_name_or_path} is a {type(decoder).__name__}{tokenizer_note}; pass a "
            "VQKDPixelDecoder trained with run_pixel_decoder.py."
        )
    if (decoder.codebook_size, tuple(decoder.patch_grid)) != (tokenizer.codebook_size, tuple(tokenizer.patch_grid)):
        raise ValueError(
            f"The decoder reads {decoder.codebook_size} codes on a {tuple(decoder.patch_grid)} grid but the tokenizer "
            f"has {tokenizer.codebook_size} codes on a {tuple(tokenizer.patch_grid)} grid: not its decoder."
        )
    return decoder


def load_processor(
    model_name_or_path: str, model: BeitV2ForMaskedImageModeling, tokenizer: VisualTokenizer
) -> BeitV2ImageProcessor:
    """The model's saved image processor; without one, the default one of its BEiT version for its sizes."""
    try:
        return BeitV2ImageProcessor.from_pretrained(model_name_or_path)
    except OSError:
        logger.warning("%s has no image processor; using the defaults for its sizes.", model_name_or_path)
    settings: dict[str, Any] = {
        "image_size": square_side(model.config.image_size),
        "patch_size": square_side(model.config.patch_size),
        "tokenizer_image_size": tokenizer.image_size,
    }
    if isinstance(tokenizer, DVAEModel):
        return BeitV2ImageProcessor.for_beit_v1(**settings)
    return BeitV2ImageProcessor(**settings)


def check_processor_view(
    processor: BeitV2ImageProcessor, tokenizer: VisualTokenizer, model_name_or_path: str, tokenizer_name_or_path: str
) -> None:
    """The saved processor feeds the tokenizer the view it was trained with: its size, and the dVAE's DALL-E view
    exactly when the tokenizer is a dVAE."""
    if processor.tokenizer_image_size != tokenizer.image_size:
        raise ValueError(
            f"The image processor saved with {model_name_or_path} feeds its tokenizer {processor.tokenizer_image_size} "
            f"px views, but the tokenizer {tokenizer_name_or_path} reads {tokenizer.image_size} px images: not the "
            "tokenizer this model was trained with (pass the one given to run_mim.py --tokenizer_name_or_path)."
        )
    dall_e_view = getattr(processor, "tokenizer_interpolation", None) == "lanczos"
    if dall_e_view != isinstance(tokenizer, DVAEModel):
        view = "the BEiT v1 (DALL-E) view" if dall_e_view else "the BEiT v2 view"
        raise ValueError(
            f"The image processor saved with {model_name_or_path} feeds its tokenizer {view}, but the tokenizer "
            f"{tokenizer_name_or_path} is a {type(tokenizer).__name__}: not the tokenizer this model was trained with."
        )


def check_pairing(model: BeitV2ForMaskedImageModeling, tokenizer: VisualTokenizer) -> None:
    if model.config.vocab_size != tokenizer.codebook_size:
        raise ValueError(
            f"The model predicts {model.config.vocab_size} codes but the tokenizer has {tokenizer.codebook_size}."
        )
    if tuple(model.config.patch_grid) != tuple(tokenizer.patch_grid):
        raise ValueError(
            f"The model's patch grid {tuple(model.config.patch_grid)} differs from the tokenizer's "
            f"{tuple(tokenizer.patch_grid)}."
        )


def grey_out(pixels: torch.Tensor, bool_masked_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`(B, 3, H, W)` pixels with the patches masked in `bool_masked_pos` `(B, rows * cols)` set to `MASK_GREY`."""
    rows, cols = grid
    mask = bool_masked_pos.view(-1, 1, rows, cols).float()
    mask = torch.nn.functional.interpolate(mask, size=pixels.shape[2:], mode="nearest").bool()
    return pixels.masked_fill(mask, MASK_GREY)


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


@torch.no_grad()
def visualize(
    model: BeitV2ForMaskedImageModeling,
    tokenizer: VisualTokenizer,
    renderer: Renderer,
    processor: BeitV2ImageProcessor,
    images: list[PIL.Image.Image],
    seed: int,
    device: str = "cpu",
) -> MIMVisualization:
    """Mask, tokenize, predict and render `images` (see the module docstring for the four panels)."""
    # No augmentation: the deterministic evaluation views; the masks are drawn from `seed`.
    inputs = processor.pretraining_inputs(images, rng=np.random.default_rng(seed), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device)
    tokenizer_pixels = inputs["tokenizer_pixel_values"].to(device)
    bool_masked_pos = inputs["bool_masked_pos"].to(device).bool()
    codes = tokenizer.get_codebook_indices(tokenizer_pixels).flatten(1)
    logits = model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).logits  # masked patches, row-major
    predicted_codes = codes.clone()
    predicted_codes[bool_masked_pos] = logits.argmax(dim=-1)
    correct = (predicted_codes == codes) & bool_masked_pos
    image_correct = correct.sum(1)
    image_accuracies = (image_correct / bool_masked_pos.sum(1).clamp(min=1)).tolist()
    accuracy = float(correct.sum() / bool_masked_pos.sum().clamp(min=1))

    size = renderer.image_size
    panels = torch.stack(
        [
            _resize(tokenizer_pixels, size),
            _resize(grey_out(tokenizer_pixels, bool_masked_pos, tokenizer.patch_grid), size),
            _resize(renderer.decode(codes).float(), size),
            _resize(renderer.decode(predicted_codes).float(), size),
        ],
        dim=1,
    )  # (B, 4, 3, size, size)
    return MIMVisualization(
        panels=panels.permute(0, 1, 3, 4, 2).clamp(0, 1).cpu().numpy(),
        codes=codes.cpu(),
        predicted_codes=predicted_codes.cpu(),
        bool_masked_pos=bool_masked_pos.cpu(),
        accuracy=accuracy,
        image_accuracies=image_accuracies,
        image_correct=image_correct.tolist(),
    )


def write_grid(result: MIMVisualization, path: str | Path, model_kind: str, panel_size: int) -> Path:
    """The PNG grid of `result`: one row per image, `COLUMN_TITLES`, accuracies in the title and the captions."""
    masked = result.bool_masked_pos.sum(1).tolist()
    captions = [
        f"image {index}: {right}/{count} masked codes predicted ({right / max(count, 1):.0%})"
        for index, (right, count) in enumerate(zip(result.image_correct, masked, strict=True))
    ]
    num_patches = result.bool_masked_pos.shape[1]
    title = (
        f"{model_kind}: masked-token accuracy {result.accuracy:.1%} ({sum(masked)} masked patches, "
        f"{sum(masked) / (num_patches * len(masked)):.0%} of {num_patches} per image)"
    )
    titles = list(COLUMN_TITLES)
    titles[2] += "\n(decoded)"
    titles[3] += "\n(masked: predicted)"
    return image_grid([list(row) for row in result.panels], path, titles, captions, title=title, panel_size=panel_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write the grid; returns `{"output", "accuracy", "image_accuracies", "result"}` (`result`: `MIMVisualization`)."""
    # transformers types the dataclasses as `DataClassType`, a NewType that no class is an instance of.
    (args,) = HfArgumentParser(VisualizeMIMArguments).parse_args_into_dataclasses(  # type: ignore[arg-type]
        args=sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    model = BeitV2ForMaskedImageModeling.from_pretrained(args.model_name_or_path)
    model = model.eval().requires_grad_(False).to(args.device)
    tokenizer = load_visual_tokenizer(args.tokenizer_name_or_path, (VQKDModel, DVAEModel)).to(args.device)
    check_pairing(model, tokenizer)
    renderer = load_renderer(tokenizer, args.decoder_name_or_path).to(args.device)
    processor = load_processor(args.model_name_or_path, model, tokenizer)
    check_processor_view(processor, tokenizer, args.model_name_or_path, args.tokenizer_name_or_path)
    if args.mask_ratio is not None:
        processor.mask_ratio, processor.num_masking_patches = args.mask_ratio, None
    images = read_images(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        image_dir=args.image_dir,
        data_files=args.data_files,
        split=args.dataset_split,
        image_column_name=args.image_column_name,
        num_images=args.num_images,
    )
    result = visualize(model, tokenizer, renderer, processor, images, args.seed, args.device)
    kind = "BEiT v1" if isinstance(tokenizer, DVAEModel) else "BEiT v2"
    path = write_grid(result, args.output, kind, args.panel_size)
    logger.info("Masked-token accuracy %.3f over %d images; wrote %s", result.accuracy, len(result.panels), path)
    return {
        "output": str(path),
        "accuracy": result.accuracy,
        "image_accuracies": result.image_accuracies,
        "result": result,
    }


if __name__ == "__main__":
    main()
