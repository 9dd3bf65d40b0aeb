#!/usr/bin/env python
"""Stage 2 of BEiT v2 (or BEiT v1): masked image modeling against a frozen visual tokenizer, with Accelerate.

    accelerate launch --config_file examples/configs/ddp.yaml examples/run_mim.py \\
        --dataset_name timm/imagenet-1k-wds --tokenizer_name_or_path path/to/vqkd \\
        --config_name base --num_masking_patches 75 --output_dir beitv2-base --per_device_train_batch_size 128 \\
        --max_steps 187500 --mixed_precision bf16

Defaults follow the paper (appendix E, ViT-B 300 epochs): AdamW betas (0.9, 0.98), weight decay 0.05, peak lr
1.5e-3 at batch 2048 (scaled linearly to the total batch unless --learning_rate is given), warmup 10 of 300
epochs then per-step cosine to 1e-5, gradient clipping at 3.0, blockwise masking of 40% of the patches. The
tokenizer (VQ-KD, or the DALL-E dVAE with --beit_v1) is frozen, in eval mode, kept out of `prepare()` and never
saved with the checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from training import (
    DataArguments,
    PretrainingArguments,
    build_accelerator,
    finish_training,
    outside_zero3,
    parse_arguments,
    parse_config_overrides,
    setup_pretraining,
    train,
)
from visual_tokenizers import VisualTokenizer, codebook_size, load_visual_tokenizer, tokenizer_image_size

from modeling_beitv2 import BEITV2_PRESETS, BeitV2Config, BeitV2ForMaskedImageModeling, DVAEModel, VQKDModel
from processing import BeitV2ImageProcessor

logger = logging.getLogger(__name__)

PAPER_LEARNING_RATE, PAPER_BATCH_SIZE = 1.5e-3, 2048


@dataclass
class MIMModelArguments:
    tokenizer_name_or_path: str = field(
        metadata={"help": "Frozen tokenizer: a VQ-KD (BEiT v2) or dVAE (BEiT v1, with --beit_v1) name or path."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue from a saved MIM model."})
    config_name: str = field(default="base", metadata={"help": f"Backbone preset: {sorted(BEITV2_PRESETS)}."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value, e.g. 'hidden_size=32,num_hidden_layers=4'."}
    )
    image_size: int = field(default=224, metadata={"help": "Training resolution of the backbone."})
    mask_ratio: float = field(default=0.4, metadata={"help": "Fraction of patches masked (blockwise)."})
    num_masking_patches: int | None = field(
        default=None,
        metadata={"help": "Exact number of masked patches; wins over --mask_ratio. The official recipe: 75 of 196."},
    )
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "Stochastic depth; default: the config's (0.0; 0.1 for 1600 epochs)."}
    )
    beit_v1: bool = field(
        default=False,
        metadata={
            "help": "BEiT v1: dVAE tokens (112 px lanczos DALL-E-mapped view), no patch aggregation, 0.5 mean/std."
        },
    )


@dataclass
class MIMTrainingArguments(PretrainingArguments):
    weight_decay: float = field(default=0.05)
    adam_beta2: float = field(default=0.98, metadata={"help": "0.98 for 300 epochs, 0.999 for 1600 (paper)."})
    warmup_ratio: float = field(default=10 / 300, metadata={"help": "10 of 300 epochs in the paper."})
    max_grad_norm: float | None = field(default=3.0)


def load_tokenizer(args: MIMModelArguments) -> VisualTokenizer:
    """The frozen tokenizer, checked against the BEiT version chosen by --beit_v1."""
    if args.beit_v1:
        return load_visual_tokenizer(args.tokenizer_name_or_path, (DVAEModel,), "--beit_v1 needs a DVAEModel")
    hint = "BEiT v2 needs a VQKDModel, or pass --beit_v1"
    return load_visual_tokenizer(args.tokenizer_name_or_path, (VQKDModel,), hint)


def build_model(args: MIMModelArguments, tokenizer: VisualTokenizer) -> BeitV2ForMaskedImageModeling:
    if args.model_name_or_path:
        model = BeitV2ForMaskedImageModeling.from_pretrained(args.model_name_or_path)
    else:
        overrides = {"image_size": args.image_size, "vocab_size": codebook_size(tokenizer)}
        if args.beit_v1:
            overrides["use_patch_aggregation"] = False
        overrides.update(parse_config_overrides(args.config_overrides))
        if args.drop_path_rate is not None:
            overrides["drop_path_rate"] = args.drop_path_rate
        model = BeitV2ForMaskedImageModeling(BeitV2Config.from_preset(args.config_name, **overrides))
    config = model.config
    if config.vocab_size != codebook_size(tokenizer):
        raise ValueError(
            f"The model predicts {config.vocab_size} classes but the tokenizer has {codebook_size(tokenizer)} codes."
        )
    if tuple(config.patch_grid) != tuple(tokenizer.config.patch_grid):
        raise ValueError(
            f"The model's patch grid {tuple(config.patch_grid)} differs from the tokenizer's "
            f"{tuple(tokenizer.config.patch_grid)}; the labels must cover the same patches."
        )
    return model


def build_image_processor(args: MIMModelArguments, model_config: BeitV2Config, tokenizer) -> BeitV2ImageProcessor:
    image_size = model_config.image_size
    settings = {
        "image_size": image_size,
        "patch_size": model_config.patch_size,
        "mask_ratio": args.mask_ratio,
        "num_masking_patches": args.num_masking_patches,
    }
    if args.beit_v1:
        return BeitV2ImageProcessor.for_beit_v1(**settings, tokenizer_image_size=tokenizer_image_size(tokenizer))
    return BeitV2ImageProcessor(**settings, tokenizer_image_size=tokenizer_image_size(tokenizer))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(
        (MIMModelArguments, DataArguments, MIMTrainingArguments), argv
    )
    accelerator = build_accelerator(training_args)

    with outside_zero3(accelerator):
        tokenizer = load_tokenizer(model_args).to(accelerator.device)
    model = build_model(model_args, tokenizer)
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    processor = build_image_processor(model_args, model.config, tokenizer)

    def transform(image, rng):
        processor.set_seed(rng)
        features = processor.preprocess(image, do_augment=True, return_tensors="np")
        return {name: features[name][0] for name in processor.model_input_names}

    setup = setup_pretraining(
        accelerator, model, data_args, training_args, transform, PAPER_LEARNING_RATE, PAPER_BATCH_SIZE
    )
    logger.info(
        "Masked image modeling (%s) for %d steps at peak lr %.3g with tokenizer %s.",
        "BEiT v1" if model_args.beit_v1 else "BEiT v2",
        setup.num_training_steps,
        setup.learning_rate,
        model_args.tokenizer_name_or_path,
    )

    def step_function(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            labels = tokenizer.get_codebook_indices(batch["tokenizer_pixel_values"])
        outputs = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"], labels=labels)
        metrics = {"loss_1": outputs.loss_mim, "mlm_acc_1": outputs.mim_accuracy}
        if outputs.loss_aggregation is not None:
            metrics.update(loss_2=outputs.loss_aggregation, mlm_acc_2=outputs.aggregation_accuracy)
        return outputs.loss, metrics

    state = train(
        accelerator,
        training_args,
        setup,
        step_function,
        tracker_config=vars(model_args),
        project_name="beitv1-mim" if model_args.beit_v1 else "beitv2-mim",
    )
    finish_training(
        accelerator,
        training_args,
        data_args,
        setup,
        state,
        processor,
        card_kind="mim",
        card_fields={
            "family": "beit" if model_args.beit_v1 else "beitv2",
            "size": None if model_args.model_name_or_path else model_args.config_name,
        },
    )
    return state


if __name__ == "__main__":
    main()
