"""The demo's stand-in for CLIP: a tiny ViT trained with the labels, saved as a teacher for `run_vqkd.py`.

BEiT v2 distils a semantic teacher (CLIP ViT-B/16 in the paper, `openai/clip-vit-base-patch16`), which cannot be
downloaded offline. This one is trained in process (a few seconds of work per hundred steps at 32 px) and saved with
its image processor, so that `run_vqkd.py --teacher_name_or_path` loads it like any Hub vision model.

    teacher = train_teacher(splits["train"], splits["validation"], Path("demo_output/teacher"), steps=1000, seed=0)
    teacher["eval_accuracy"]  # about 0.97 at the full size
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from demo_pipeline.data import CLASS_NAMES, load_labelled_images
from demo_pipeline.settings import BATCH_SIZE, IMAGE_SIZE, PATCH_SIZE, WIDTH
from processing import VQKDImageProcessor


def train_teacher(train_dir: Path, eval_dir: Path, output_dir: Path, steps: int, seed: int) -> dict[str, float]:
    """Train a tiny ViT on the labels and save it (with its image processor) as a teacher for `run_vqkd.py`.

    The classifier reads the mean of the final patch tokens, so that every patch token, which is what VQ-KD
    distils, is trained to carry the class. Augmentation: random resized crops (40-100% of the image) and flips.

    Returns:
        The classifier's accuracy on the last training batches and on the evaluation split.
    """
    torch.manual_seed(seed)
    images, labels = load_labelled_images(train_dir)
    config = ViTConfig(**WIDTH, num_hidden_layers=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    backbone = ViTModel(config, add_pooling_layer=False)
    classifier = nn.Linear(config.hidden_size, len(CLASS_NAMES))

    def classify(pixel_values: torch.Tensor) -> torch.Tensor:
        # (batch, 3, IMAGE_SIZE, IMAGE_SIZE) -> (batch, num_classes); token 0 is [CLS], the rest are the patches.
        return classifier(backbone(pixel_values=pixel_values).last_hidden_state[:, 1:].mean(dim=1))

    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    # Pixels in [-1, 1]: the teacher's image processor below says mean = std = 0.5.
    processor = VQKDImageProcessor(
        image_size=IMAGE_SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, crop_scale=(0.4, 1.0)
    )
    augmentation = processor.training_augmentation()
    rng = np.random.default_rng(seed)  # the batches and their augmentation
    backbone.train()
    train_accuracies = []
    for _ in range(steps):
        batch = rng.choice(len(images), BATCH_SIZE, replace=False)
        pixel_values = processor.pretraining_inputs(
            list(images[batch]), augmentation=augmentation, rng=rng, return_tensors="pt"
        )["pixel_values"]
        logits = classify(pixel_values)
        target = torch.from_numpy(labels[batch])
        loss = nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_accuracies.append((logits.argmax(-1) == target).float().mean().item())
    backbone.eval()
    eval_images, eval_labels = load_labelled_images(eval_dir)
    with torch.no_grad():
        pixel_values = processor.preprocess(list(eval_images), return_tensors="pt")["pixel_values"]
        eval_accuracy = (classify(pixel_values).argmax(-1) == torch.from_numpy(eval_labels)).float().mean().item()
    backbone.save_pretrained(output_dir)
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(output_dir)
    return {"train_accuracy": float(np.mean(train_accuracies[-20:])), "eval_accuracy": eval_accuracy}
