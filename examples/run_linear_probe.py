#!/usr/bin/env python
"""Linear probing and k-NN classification on frozen BEiT v2 / BEiT features.

The reference code never shipped a linear-probe script (unilm issue 1574), so this is the protocol, exactly:

1. Images. Train and evaluation images both go through the evaluation transform — bicubic resize of the shorter
   side to `image_size / 0.875`, centre crop `image_size` (the checkpoint's pretraining resolution), the
   checkpoint's pretraining mean/std — with no augmentation; each image is featurised once.
2. Features. The backbone runs in eval mode (no drop path) under `torch.no_grad()`. Tokens are the last layer's
   output after the final LayerNorm of the pretraining model (the MIM model's `layernorm`, or a native `beit`
   checkpoint's own final norm when it has one). The image feature is the [CLS] token when the checkpoint was
   pretrained with patch aggregation (`use_patch_aggregation=True`, as BEiT v2), else the mean of the patch
   tokens, as in the paper (section 3.2); `--pooling cls|mean` overrides.
3. Linear probe. A `BatchNorm1d(affine=False)` (parameter-free: per-feature standardisation with batch
   statistics in training, running statistics at evaluation; `--batch_norm False` removes it) followed by a
   `Linear(hidden_size, num_classes)` with weight ~ truncated normal(std 0.01) and zero bias, trained with
   cross entropy by SGD (momentum 0.9, no weight decay by default) on shuffled mini-batches of
   `--probe_batch_size` cached features for `--num_train_epochs` epochs; the lr is `--learning_rate` (0.1)
   scaled by batch size / 256, with a linear warmup over the first `--warmup_epochs` epochs then a cosine decay
   to 0, updated every step. Reported: top-1 (and top-5 with more than 5 classes) on the evaluation split after
   the last epoch — no model selection on the evaluation split.
4. k-NN (`--knn`): the same features, L2-normalised; each evaluation image takes its `k` (20) most
   cosine-similar training images, each voting for its class with weight `exp(similarity / temperature)`
   (temperature 0.07, the DINO protocol); the class with the largest summed vote wins; top-1 reported.

Without an evaluation split, `--train_val_split` (default 0.15) of the training split is held out for evaluation,
seeded by `--seed`. Results go to `{output_dir}/probe_results.json`.

    python examples/run_linear_probe.py --model_name_or_path path/to/beitv2-mim --dataset_name imagenet-1k \
        --output_dir probe-out --knn
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from datasets import Image as ImageFeature
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, BeitModel, set_seed

from finetuning.data import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    ClassificationDataArguments,
    class_names,
    detect_column,
    first_examples,
    load_image_classification_data,
    prepare_splits,
)
from modeling_beitv2 import BeitV2ForMaskedImageModeling
from pretraining.arguments import parse_arguments, square_side
from pretraining.data import decode_or_skip, new_decode_counts
from processing.evaluation import evaluation_image_processor, saved_normalisation

logger = logging.getLogger(__name__)


# Keyword-only: the required fields below follow the data flags' defaults (declared in `finetuning.data`).
@dataclass(kw_only=True)
class ProbeArguments(ClassificationDataArguments):
    """The shared classification data flags (the probe trains on `--train_split` and is evaluated on
    `--validation_split`), plus the backbone, the pooling, the probe's optimisation and the k-NN vote."""

    model_name_or_path: str = field(metadata={"help": "BEiT v2 MIM checkpoint or native 'beit' checkpoint."})
    output_dir: str = field(metadata={"help": "Where probe_results.json goes."})
    pooling: str = field(
        default="auto",
        metadata={
            "help": "auto (cls with patch aggregation, else mean), cls or mean.",
            "choices": ["auto", "cls", "mean"],
        },
    )
    feature_batch_size: int = field(default=64, metadata={"help": "Images per forward pass when featurising."})
    batch_norm: bool = field(default=True, metadata={"help": "Parameter-free BatchNorm before the linear head."})
    learning_rate: float = field(default=0.1, metadata={"help": "SGD lr per 256 features (scaled by batch/256)."})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay of the linear head."})
    probe_batch_size: int = field(default=256, metadata={"help": "Features per SGD step."})
    num_train_epochs: int = field(default=90, metadata={"help": "Epochs over the cached training features."})
    warmup_epochs: int = field(default=10, metadata={"help": "Linear warmup epochs."})
    knn: bool = field(default=False, metadata={"help": "Also report weighted k-NN top-1 on the same features."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours per query."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(cosine / temperature)."})
    seed: int = field(default=0, metadata={"help": "Seed of the head init and the mini-batch order."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device."})


class FrozenBackbone(nn.Module):
    """The pretrained encoder with its final LayerNorm, returning one feature per image, `(batch, hidden_size)`."""

    def __init__(self, model_name_or_path: str, pooling: str) -> None:
        super().__init__()
        config = AutoConfig.from_pretrained(model_name_or_path)
        self.encoder: BeitModel  # a BeitV2Model for a MIM checkpoint
        self.final_norm: nn.LayerNorm | None
        if config.model_type == "beitv2":
            mim = BeitV2ForMaskedImageModeling.from_pretrained(model_name_or_path)
            self.encoder, self.final_norm = mim.beit, mim.layernorm
            aggregation = config.use_patch_aggregation
        elif config.model_type == "beit":
            # BeitModel applies its own final LayerNorm to `last_hidden_state` when the checkpoint has one.
            self.encoder, self.final_norm = (
                BeitModel.from_pretrained(model_name_or_path, add_pooling_layer=False),
                None,
            )
            aggregation = False
        else:
            raise ValueError(
                f"{model_name_or_path} has model_type {config.model_type!r}; expected 'beitv2' or 'beit'."
            )
        self.pooling = ("cls" if aggregation else "mean") if pooling == "auto" else pooling
        self.image_size = square_side(config.image_size)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(pixel_values=pixel_values).last_hidden_state
        if self.final_norm is not None:
            tokens = self.final_norm(tokens)
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(dim=1)


def extract_features(backbone, split, image_column, label_column, processor, batch_size, device, description):
    """Featurise a dataset split: returns `(features (N, hidden_size) float32, labels (N,) int64)` on CPU.

    Images are decoded here (`pretraining.data.decode_or_skip`): odd modes become RGB, and an unreadable image is
    skipped with its label and logged with its reason, instead of stopping the run.
    """
    split = split.cast_column(image_column, ImageFeature(decode=False))
    features, labels, decode_counts = [], [], new_decode_counts()
    for start in tqdm(range(0, len(split), batch_size), desc=description):
        batch = split[start : start + batch_size]
        images, batch_labels = [], []
        for value, label in zip(batch[image_column], batch[label_column]):
            image = decode_or_skip(value, decode_counts)
            if image is None:
                continue
            images.append(image)
            batch_labels.append(label)
        if not images:
            continue
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(device)
        features.append(backbone(pixel_values).float().cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
    if decode_counts["num_bad_images"]:
        logger.warning("%s: skipped %d unreadable images.", description, decode_counts["num_bad_images"])
    return torch.cat(features), torch.cat(labels)


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    batch_norm: bool,
    learning_rate: float,
    batch_size: int,
    weight_decay: float,
    num_epochs: int,
    warmup_epochs: int,
    seed: int,
    device: str,
) -> nn.Module:
    """Train BatchNorm(affine=False) + Linear on cached features with SGD, warmup + cosine lr (see module doc)."""
    generator = torch.Generator().manual_seed(seed)
    dim = train_features.shape[1]
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.01, generator=generator)
        nn.init.zeros_(head.bias)
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head) if batch_norm else head
    probe = probe.to(device)
    base_lr = learning_rate * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    total_steps, warmup_steps = num_epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))

    probe.train()
    step = 0
    for _ in range(num_epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2 and batch_norm:
                continue  # BatchNorm cannot normalise a batch of one
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits = probe(train_features[index].to(device))
            loss = nn.functional.cross_entropy(logits, train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class scores `(num_queries, num_classes)`: the `k` most cosine-similar training features
    vote for their class with weight `exp(similarity / temperature)`."""
    if k > len(train_features):
        raise ValueError(f"knn_k={k} exceeds the number of training features ({len(train_features)}).")
    bank = nn.functional.normalize(train_features, dim=1)
    queries = nn.functional.normalize(query_features, dim=1)
    scores = []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_index), num_classes, dtype=similarity.dtype, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def main() -> None:
    (args,) = parse_arguments((ProbeArguments,))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    raw = load_image_classification_data(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        train_split=args.train_split,
        validation_split=args.validation_split,
    )
    raw = prepare_splits(raw, args.splits(), args.seed, do_train=True, do_eval=True)
    splits = {
        "train": first_examples(raw[args.train_split], args.max_train_samples),
        "eval": first_examples(raw[args.validation_split], args.max_eval_samples),
    }
    columns = list(splits["train"].features)
    image_column = detect_column(columns, args.image_column_name, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = detect_column(columns, args.label_column_name, LABEL_COLUMN_CANDIDATES, "label")
    num_classes = len(class_names(splits["train"], label_column))

    backbone = FrozenBackbone(args.model_name_or_path, args.pooling).to(args.device)
    image_mean, image_std = saved_normalisation(args.model_name_or_path)
    processor = evaluation_image_processor(backbone.image_size, image_mean, image_std)
    train_features, train_labels = extract_features(
        backbone,
        splits["train"],
        image_column,
        label_column,
        processor,
        args.feature_batch_size,
        args.device,
        "train features",
    )
    eval_features, eval_labels = extract_features(
        backbone,
        splits["eval"],
        image_column,
        label_column,
        processor,
        args.feature_batch_size,
        args.device,
        "eval features",
    )

    probe = train_linear_probe(
        train_features,
        train_labels,
        num_classes,
        batch_norm=args.batch_norm,
        learning_rate=args.learning_rate,
        batch_size=args.probe_batch_size,
        weight_decay=args.weight_decay,
        num_epochs=args.num_train_epochs,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
    )
    with torch.no_grad():
        eval_logits = probe(eval_features.to(args.device)).cpu()
    results = {
        "pooling": backbone.pooling,
        "num_classes": num_classes,
        "num_train": len(train_features),
        "num_eval": len(eval_features),
        "linear_probe_top1": top_k_accuracy(eval_logits, eval_labels, 1),
    }
    if num_classes > 5:
        results["linear_probe_top5"] = top_k_accuracy(eval_logits, eval_labels, 5)
    if args.knn:
        knn_scores = knn_predict(
            train_features.to(args.device),
            train_labels.to(args.device),
            eval_features.to(args.device),
            num_classes,
            k=args.knn_k,
            temperature=args.knn_temperature,
        ).cpu()
        results["knn_top1"] = top_k_accuracy(knn_scores, eval_labels, 1)
    results["arguments"] = asdict(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "probe_results.json"), "w") as file:
        json.dump(results, file, indent=2)
    logger.info({key: value for key, value in results.items() if key != "arguments"})


if __name__ == "__main__":
    main()
