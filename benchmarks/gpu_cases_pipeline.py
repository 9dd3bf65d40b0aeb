"""bench_gpu.py's ``pipeline`` section: run_mim.py's per-image transform and collator through the examples' data path.

It streams the generated JPEGs through examples/pretraining/data.py (imported
only here, so that the model sections run without ``datasets``) with all cores but two and with one worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gpu_common import Bench, SectionSkipped, import_examples_module


def loader_worker_counts() -> list[int]:
    """The loader widths measured: all cores but two (one for the training process, one spare), and one."""
    return list(dict.fromkeys([max(1, (os.cpu_count() or 1) - 2), 1]))


def pipeline_section(bench: Bench) -> None:
    try:  # needs `datasets`
        # The sources, the stream, the loader and the per-image transform the training scripts run.
        data = import_examples_module("pretraining.data")
    except ImportError as error:
        raise SectionSkipped(
            f"the examples' data modules cannot be imported: {error} (carry the datasets wheels)."
        ) from error
    from processing import BeitV2ImageProcessor

    sizes = bench.sizes
    images = bench.images_dir()
    processor = BeitV2ImageProcessor(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        num_masking_patches=sizes.num_masked_patches,
        tokenizer_image_size=sizes.image_size,
    )
    transform = data.image_transform(processor, augment=True)
    for workers in loader_worker_counts():
        try:
            dataset, image_column = data.load_image_stream(train_dir=str(images), min_shards=workers)
            stream = data.ImageStream(dataset, image_column, transform, seed=0, shuffle_buffer_size=1000)
            loader = data.build_dataloader(stream, sizes.batch_size, workers, pin_memory=bench.device.type == "cuda")
            measured = measure_loader(
                loader, warmup_batches=max(1, loader.num_workers), seconds=sizes.pipeline_seconds
            )
            bench.results.add(
                "pipeline",
                {
                    "table": "pipeline",
                    "workers": workers,
                    "workers_used": loader.num_workers,
                    "shards": getattr(dataset, "num_shards", None),
                    "batch_size": sizes.batch_size,
                    "images_per_s": measured["images_per_s"],
                    "images_per_s_per_worker": measured["images_per_s"] / max(1, loader.num_workers),
                    "images_timed": measured["images"],
                    "num_files": sizes.num_images,
                },
            )
        except Exception as error:
            bench.results.add_error("pipeline", f"{workers} worker(s)", error)


def measure_loader(loader: Any, warmup_batches: int, seconds: float) -> dict[str, float]:
    """Images/s of a DataLoader after `warmup_batches` batches (worker start-up, first shuffle windows), over at least
    `seconds` and one batch."""
    iterator = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        images, started = 0, time.perf_counter()
        while True:
            batch = next(iterator)
            images += int(batch["pixel_values"].shape[0])
            if time.perf_counter() - started >= seconds:
                break
        elapsed = time.perf_counter() - started
    finally:
        del iterator  # stops the workers
    return {"images_per_s": images / elapsed, "images": images}
