"""
Data-pipeline throughput on ONE CPU core: decode a 500x375 JPEG -> two-view augmentation -> mask -> batch tensors,
with exactly the per-image transform (`training.image_transform`) and the collator (`build_dataloader`'s default,
`DataCollatorForMaskedImageModeling`) that examples/run_mim.py trains with.

Prints one JSON line per preset: {"benchmark": "data_pipeline", "preset": ..., "images_per_s_per_core": ..., ...}.
Give `--train_images_per_s` (the MIM training throughput of one GPU, from the training-step benchmark) to also get
the number of cores that keep that GPU fed.

    python benchmarks/bench_data_pipeline.py [--num_images 200] [--train_images_per_s 1100]
"""

import os

# One core: pin every thread pool before numpy and torch start theirs.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from processing import BeitV2ImageProcessor, DataCollatorForMaskedImageModeling  # noqa: E402

# The training scripts import their helpers as top-level modules from examples/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from pretraining.data import image_transform  # noqa: E402

torch.set_num_threads(1)


def make_jpeg(width: int = 500, height: int = 375) -> bytes:
    """A photo-like JPEG (smooth gradients plus texture), so decoding and resampling cost what real images cost."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([xs, ys, 0.5 * (np.sin(8 * xs) + 1)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run(preset: str, processor: BeitV2ImageProcessor, jpeg: bytes, num_images: int, batch_size: int) -> dict:
    transform = image_transform(processor, augment=True)
    collator = DataCollatorForMaskedImageModeling()
    timings = {"decode": 0.0, "augment_and_mask": 0.0, "collate": 0.0}
    # Warm-up: first calls pay for lazy imports and allocator growth.
    for index in range(5):
        transform(PIL.Image.open(io.BytesIO(jpeg)), np.random.default_rng([0, index]))
    examples = []
    start = time.perf_counter()
    for index in range(num_images):
        t0 = time.perf_counter()
        image = PIL.Image.open(io.BytesIO(jpeg))
        image.load()
        # Each example draws from its own generator, as in the scripts' ImageStream (its creation is timed too).
        rng = np.random.default_rng([1, index])
        t1 = time.perf_counter()
        examples.append(transform(image, rng))
        t2 = time.perf_counter()
        timings["decode"] += t1 - t0
        timings["augment_and_mask"] += t2 - t1
        if len(examples) == batch_size:
            collator(examples)
            examples = []
            timings["collate"] += time.perf_counter() - t2
    elapsed = time.perf_counter() - start
    return {
        "benchmark": "data_pipeline",
        "preset": preset,
        "images_per_s_per_core": round(num_images / elapsed, 1),
        "ms_per_image": {name: round(1000 * value / num_images, 2) for name, value in timings.items()},
        "image_size": processor.image_size,
        "tokenizer_image_size": processor.tokenizer_image_size,
        "num_images": num_images,
        "batch_size": batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--train_images_per_s", type=float, default=None, help="MIM training images/s of one GPU, to size the workers"
    )
    args = parser.parse_args()
    jpeg = make_jpeg()
    presets = {"beit_v2": BeitV2ImageProcessor(), "beit_v1": BeitV2ImageProcessor.for_beit_v1()}
    for preset, processor in presets.items():
        result = run(preset, processor, jpeg, args.num_images, args.batch_size)
        if args.train_images_per_s:
            result["train_images_per_s"] = args.train_images_per_s
            result["cores_to_feed_training"] = math.ceil(args.train_images_per_s / result["images_per_s_per_core"])
        result["machine"] = f"{platform.processor() or platform.machine()}, Pillow {PIL.__version__}"
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
