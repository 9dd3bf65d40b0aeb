"""How often a frozen VQ-KD tokenizer gives the same codes in half precision as in fp32.

`run_mim.py` tokenizes every batch with the frozen tokenizer; under `--bf16` / `--fp16` it runs the tokenizer's
ViT under autocast (the encode task layer and the nearest-code search stay fp32 inside the model). This measures
what that costs in labels: the fraction of patches whose code under bf16 / fp16 autocast equals the fp32 code, for

* a trained tokenizer given with `--tokenizer` (e.g. the demo's `demo_output/vqkd`), on images of its resolution;
* a "converted-style" random tokenizer: the official base-decoder3 shape (ViT-B/16 encoder at 224 px, 8192 x 32
  unit codebook, random weights), the configuration that official checkpoints convert to.

Images are the demo's generated pattern images (`examples/demo_pipeline/data.py`) at each tokenizer's resolution, or
`--images DIR` (any image folder). Prints one JSON line per tokenizer and precision.

    python benchmarks/bench_tokenizer_precision.py --tokenizer demo_output/vqkd [--num_images 64] [--device cuda]

On a CPU, bf16 autocast rounds matmul inputs to bf16 and accumulates in fp32, as GPU tensor cores do, so the
agreement measured here is a close proxy for a GPU's (it is not bit-identical: kernels differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from demo_pipeline.data import render_pattern  # noqa: E402
from modeling_beitv2 import VQKDConfig, VQKDModel  # noqa: E402
from processing import VQKDImageProcessor  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_unit_codebook_tokenizer(preset: str = "base-decoder3", image_size: int = 224) -> VQKDModel:
    """The official tokenizer's shape with random weights and a random unit codebook (ready to tokenize)."""
    torch.manual_seed(0)
    model = VQKDModel(VQKDConfig.from_preset(preset, image_size=image_size, kmeans_init=False))
    return model.eval()


def load_images(folder: str | None, count: int, image_size: int) -> list[Image.Image]:
    if folder is None:
        rng = np.random.default_rng(0)
        return [Image.fromarray(render_pattern(index % 6, image_size, rng)) for index in range(count)]
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not paths:
        raise ValueError(f"No .png/.jpg/.jpeg/.webp images under {folder}.")
    return [Image.open(path).convert("RGB") for path in paths[:count]]


@torch.no_grad()
def codes(model: VQKDModel, pixel_values: torch.Tensor, dtype: torch.dtype | None, batch_size: int) -> torch.Tensor:
    chunks = []
    for start in range(0, pixel_values.shape[0], batch_size):
        batch = pixel_values[start : start + batch_size]
        with torch.autocast(batch.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            chunks.append(model.get_codebook_indices(batch))
    return torch.cat(chunks)


def measure(name: str, model: VQKDModel, images: list[Image.Image], device: str, batch_size: int) -> None:
    image_size = model.config.encoder_config.image_size
    pixel_values = VQKDImageProcessor(image_size=image_size)(images, return_tensors="pt")["pixel_values"]
    model = model.to(device)
    pixel_values = pixel_values.to(device)
    reference = codes(model, pixel_values, None, batch_size)
    for precision, dtype in PRECISIONS.items():
        try:
            half = codes(model, pixel_values, dtype, batch_size)
        except RuntimeError as error:  # e.g. an op without a half kernel on this device
            print(json.dumps({"tokenizer": name, "precision": precision, "error": str(error)[:200]}), flush=True)
            continue
        per_image = (half == reference).float().mean(dim=1)
        record = {
            "tokenizer": name,
            "precision": precision,
            "device": device,
            "images": len(images),
            "patches": reference.numel(),
            "codes_equal_to_fp32": round(float((half == reference).float().mean()), 4),
            "worst_image": round(float(per_image.min()), 4),
            "distinct_codes_fp32": int(reference.unique().numel()),
        }
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="A saved VQKDModel folder (e.g. demo_output/vqkd).")
    parser.add_argument("--images", help="An image folder (default: generated pattern images).")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--random_num_images", type=int, default=16, help="Images for the ViT-B random tokenizer.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tokenizer:
        trained = VQKDModel.from_pretrained(args.tokenizer).eval()
        size = trained.config.encoder_config.image_size
        measure(args.tokenizer, trained, load_images(args.images, args.num_images, size), args.device, args.batch_size)
    random_model = random_unit_codebook_tokenizer()
    images = load_images(args.images, args.random_num_images, 224)
    measure("random base-decoder3 (224 px, 8192 codes)", random_model, images, args.device, args.batch_size)


if __name__ == "__main__":
    main()
