#!/usr/bin/env python
"""Stage 1 of BEiT v2: train the VQ-KD visual tokenizer against a frozen teacher, with Accelerate.

    accelerate launch --config_file examples/configs/ddp.yaml examples/run_vqkd.py \\
        --dataset_name timm/imagenet-1k-wds --teacher_name_or_path openai/clip-vit-base-patch16 \\
        --output_dir vqkd-base --per_device_train_batch_size 64 --max_steps 250000 --mixed_precision bf16

Defaults follow the paper (appendix D): AdamW betas (0.9, 0.99), weight decay 1e-4, peak lr 2e-4 at batch 512
(scaled linearly to the total batch unless --learning_rate is given), 5% warmup then per-step cosine to 1e-5, no
gradient clipping, RandomResizedCrop + flip. The teacher is frozen, never passed to `prepare()` and never saved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

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
    total_batch_size,
    train,
)

from modeling_beitv2 import VQKD_PRESETS, TeacherForPatchTargets, VQKDConfig, VQKDModel
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config
from processing import VQKDImageProcessor

logger = logging.getLogger(__name__)

PAPER_LEARNING_RATE, PAPER_BATCH_SIZE = 2e-4, 512
# Short names accepted by --config_name, as for run_mim.py.
CONFIG_ALIASES = {"tiny": "tiny-decoder1", "base": "base-decoder3"}


@dataclass
class VQKDModelArguments:
    teacher_name_or_path: str = field(
        default="openai/clip-vit-base-patch16",
        metadata={
            "help": "Frozen teacher (any CLIP/ViT/DINO/DINOv2 name or path); its feature size and patch "
            "size set the tokenizer's teacher_dim and patch grid."
        },
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue from a saved tokenizer."})
    config_name: str = field(
        default="base-decoder3",
        metadata={"help": f"Tokenizer preset: {sorted(VQKD_PRESETS)} or an alias {CONFIG_ALIASES}."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value. Tokenizer keys (num_codes, code_dim, decay, beta, kmeans_init, "
            "dead_code_threshold) apply to the tokenizer; other keys to both ViTs; 'encoder.' / 'decoder.' "
            "prefixes to one of them, e.g. 'hidden_size=32,num_attention_heads=2,decoder.num_hidden_layers=1'."
        },
    )
    image_size: int = field(default=224, metadata={"help": "Training resolution."})


@dataclass
class VQKDTrainingArguments(PretrainingArguments):
    weight_decay: float = field(default=1e-4)
    adam_beta2: float = field(default=0.99)
    warmup_ratio: float = field(default=0.05, metadata={"help": "5 of 100 epochs in the paper."})


def build_tokenizer_config(args: VQKDModelArguments, teacher: TeacherForPatchTargets) -> VQKDConfig:
    """The preset's tokenizer with the teacher's feature size and patch size, plus --config_overrides."""
    name = CONFIG_ALIASES.get(args.config_name, args.config_name)
    if name not in VQKD_PRESETS:
        raise ValueError(f"Unknown --config_name {args.config_name!r}; choose one of {sorted(VQKD_PRESETS)}.")
    preset = VQKD_PRESETS[name]
    tokenizer_keys = {item.name for item in fields(VQKDConfig)} - {"encoder_config", "decoder_config"}
    top: dict[str, Any] = {}
    encoder: dict[str, Any] = {}
    decoder: dict[str, Any] = {}
    for key, value in parse_config_overrides(args.config_overrides).items():
        if key.startswith("encoder."):
            encoder[key.removeprefix("encoder.")] = value
        elif key.startswith("decoder."):
            decoder[key.removeprefix("decoder.")] = value
        elif key in tokenizer_keys:
            top[key] = value
        else:
            encoder[key], decoder[key] = value, value
    code_dim = top.get("code_dim", 32)
    grid = args.image_size // teacher.patch_size
    if grid * teacher.patch_size != args.image_size:
        raise ValueError(f"--image_size {args.image_size} is not a multiple of the teacher's patch size.")
    encoder_config = vqkd_encoder_config(
        preset["size"], image_size=args.image_size, patch_size=teacher.patch_size, **encoder
    )
    decoder_config = vqkd_decoder_config(
        preset["size"], num_layers=preset["decoder_layers"], grid_size=grid, code_dim=code_dim, **decoder
    )
    top.setdefault("teacher_dim", teacher.feature_dim)
    return VQKDConfig(encoder_config=encoder_config, decoder_config=decoder_config, **top)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(
        (VQKDModelArguments, DataArguments, VQKDTrainingArguments), argv
    )
    accelerator = build_accelerator(training_args)

    with outside_zero3(accelerator):
        teacher = TeacherForPatchTargets.from_pretrained(model_args.teacher_name_or_path)
    if model_args.model_name_or_path:
        model = VQKDModel.from_pretrained(model_args.model_name_or_path)
    else:
        model = VQKDModel(build_tokenizer_config(model_args, teacher))
    image_size = model.config.encoder_config.image_size
    teacher.check_compatible(model.config, image_size)
    teacher.to(accelerator.device)
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    processor = VQKDImageProcessor(image_size=image_size)

    def transform(image, rng):
        processor.set_seed(rng)
        return {"pixel_values": processor.preprocess(image, do_augment=True, return_tensors="np")["pixel_values"][0]}

    setup = setup_pretraining(
        accelerator, model, data_args, training_args, transform, PAPER_LEARNING_RATE, PAPER_BATCH_SIZE
    )
    logger.info(
        "Training the tokenizer for %d steps at peak lr %.3g (total batch %d) against %s.",
        setup.num_training_steps,
        setup.learning_rate,
        total_batch_size(training_args, accelerator.num_processes),
        model_args.teacher_name_or_path,
    )

    def step_function(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        pixel_values = batch["pixel_values"]
        # The teacher sees the same crop in [0, 1] and applies its own normalisation.
        teacher_features = teacher((pixel_values.float() + 1) / 2)
        outputs = model(pixel_values=pixel_values, teacher_features=teacher_features)
        return outputs.loss, {
            "rec_loss": outputs.reconstruction_loss,
            "quant_loss": outputs.quantization_loss,
            "perplexity": outputs.perplexity,
            "codebook_usage": outputs.codebook_usage,
            "dead_codes": outputs.num_dead_codes,
        }

    state = train(
        accelerator,
        training_args,
        setup,
        step_function,
        tracker_config=vars(model_args),
        project_name="vqkd",
    )
    finish_training(
        accelerator,
        training_args,
        data_args,
        setup,
        state,
        processor,
        card_kind="vqkd",
        card_fields={
            "teacher": model_args.teacher_name_or_path,
            "codebook_size": model.config.num_codes,
            "size": CONFIG_ALIASES.get(model_args.config_name, model_args.config_name).split("-")[0],
        },
    )
    return state


if __name__ == "__main__":
    main()
