#!/usr/bin/env python
"""Stage 1 of BEiT v2: train the VQ-KD visual tokenizer against a frozen teacher, with Accelerate.

    accelerate launch --config_file examples/configs/ddp.yaml examples/run_vqkd.py \\
        --dataset_name timm/imagenet-1k-wds --teacher_name_or_path openai/clip-vit-base-patch16 \\
        --output_dir vqkd-base --per_device_train_batch_size 64 --max_steps 250000 --bf16 --dataloader_num_workers 12

Defaults follow the paper (appendix D): AdamW betas (0.9, 0.99), weight decay 1e-4, peak lr 2e-4 at batch 512
(scaled linearly to the total batch unless --learning_rate is given), 5% warmup then per-step cosine to 1e-5, no
gradient clipping, RandomResizedCrop + flip. The teacher is frozen, never passed to `prepare()` and never saved; it
runs under the run's autocast (--frozen_model_precision to choose another).

The training loop is `main()`: copy this file to change the loss or add an evaluation.
Exit status: 0 when the run finished, `pretraining.loop.PREEMPTED_EXIT_CODE` (75) when SIGTERM/SIGINT stopped it before its
last step (a checkpoint was saved: relaunch with --resume_from_checkpoint latest).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_beitv2 import VQKD_PRESETS, TeacherForPatchTargets, VQKDConfig, VQKDModel
from pretraining.arguments import (
    DEFAULT_IMAGE_SIZE,
    FROZEN_MODEL_PRECISIONS,
    PRETRAINED_SETTINGS,
    DataArguments,
    PretrainingArguments,
    check_choice,
    check_hub_access,
    check_range,
    frozen_model_precision_field,
    image_size_field,
    merge_fixed,
    named_config,
    parse_arguments,
    parse_config_overrides,
    pretrained_config_updates,
    rebuild_config,
    resolve_frozen_model_precision,
)
from pretraining.checkpoints import (
    check_run_identity,
    load_checkpoint,
    prepare_output_dir,
    record_resume_changes,
    resolve_checkpoint,
    restore_rng_states,
    run_identity,
    save_checkpoint,
    weights_fingerprint,
)
from pretraining.data import (
    evaluation_dataloader,
    image_counts,
    image_transform,
    load_datasets,
    resume_dataloader,
    stream_size,
    to_device,
    training_dataloader,
)
from pretraining.loop import (
    PREEMPTED_EXIT_CODE,
    MetricsWindow,
    NonFiniteGuard,
    StopSignal,
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    check_model_type,
    end_training,
    export_model,
    final_state,
    frozen_forward,
    gradient_norm,
    load_with_flag,
    outside_zero3,
    resolve_learning_rate,
    resolve_training_steps,
    sum_over_ranks,
    total_batch_size,
    tracker_config,
    write_record,
)
from pretraining.model_cards import hub_reference
from processing import VQKDImageProcessor

logger = logging.getLogger(__name__)

PAPER_LEARNING_RATE, PAPER_BATCH_SIZE = 2e-4, 512
# Short names accepted by --config_name, like run_mim.py's "tiny" / "base".
VQKD_CONFIG_ALIASES: dict[str, str] = {"tiny": "tiny-decoder1", "base": "base-decoder3"}
VQKD_METRICS = {  # logged name -> VQKDOutput field
    "loss": "loss",
    "loss_reconstruction": "reconstruction_loss",
    "loss_quantization": "quantization_loss",
    "perplexity": "perplexity",
    "codebook_usage": "codebook_usage",
    "num_dead_codes": "num_dead_codes",
}


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
        metadata={
            "help": f"Tokenizer preset ({', '.join(sorted(VQKD_PRESETS))}), an alias {VQKD_CONFIG_ALIASES}, or a "
            "config name/path."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value. Tokenizer keys (codebook_size, code_dim, decay, beta, kmeans_init, "
            "dead_code_threshold) apply to the tokenizer; other keys to both ViTs; 'encoder.' / 'decoder.' "
            "prefixes to one of them, e.g. 'hidden_size=32,num_attention_heads=2,decoder.num_hidden_layers=1'."
        },
    )
    image_size: int | None = image_size_field()
    frozen_model_precision: str = frozen_model_precision_field("teacher")

    def __post_init__(self):
        check_range("image_size", self.image_size, low=1)
        check_choice("frozen_model_precision", self.frozen_model_precision, FROZEN_MODEL_PRECISIONS)


@dataclass
class VQKDTrainingArguments(PretrainingArguments):
    weight_decay: float = field(default=1e-4)
    adam_beta2: float = field(default=0.99)
    warmup_steps: float = field(default=0.05, metadata={"help": "Steps, or a fraction (paper: 5 of 100 epochs)."})


def vqkd_config(
    config_name: str,
    *,
    image_size: int,
    teacher_patch_size: int,
    teacher_dim: int,
    overrides: str | None,
    hub_kwargs: dict[str, Any],
) -> VQKDConfig:
    """The `VQKDConfig` of a new tokenizer (without --model_name_or_path), fitted to its teacher.

    The encoder takes the teacher's patch size at `image_size`, the decoder covers the resulting grid of codes
    (patch size 1, `num_channels == code_dim`) and `teacher_dim` is the teacher's feature size. A preset is built
    at that resolution and patch size by `VQKDConfig.from_preset`; a loaded config is refitted to them.

    Args:
        config_name: a `VQKD_PRESETS` name, an alias of `VQKD_CONFIG_ALIASES`, or a `beitv2_vqkd` config's Hub id
            or folder (its encoder / decoder sizes and codebook are kept, the teacher-dependent keys are refitted).
        image_size: training resolution; a multiple of `teacher_patch_size`.
        teacher_patch_size: the teacher's patch size, which the encoder must share so that the patches align.
        teacher_dim: the teacher's feature size, which the decoder regresses.
        overrides: `--config_overrides`. Tokenizer keys (`codebook_size`, `code_dim`, `decay`, `beta`, `kmeans_init`,
            `dead_code_threshold`, ...) apply to the tokenizer, `encoder.` / `decoder.` prefixed keys to one ViT,
            other keys to both ViTs.
        hub_kwargs: `revision` / `token` / `trust_remote_code` for loading `config_name`.

    Raises:
        ValueError: an unknown `config_name` or a config of another model type, a bad override or one that
            contradicts the teacher, or an `image_size` that is not a multiple of `teacher_patch_size`.
    """
    if image_size % teacher_patch_size:
        raise ValueError(
            f"--image_size {image_size} is not a multiple of the teacher's patch size {teacher_patch_size}."
        )
    preset_kwargs = {"image_size": image_size, "patch_size": teacher_patch_size}
    base = named_config(config_name, VQKDConfig, VQKD_PRESETS, VQKD_CONFIG_ALIASES, hub_kwargs, preset_kwargs)
    grid = image_size // teacher_patch_size
    parsed = parse_config_overrides(overrides, base)
    code_dim = parsed.get("code_dim", base.code_dim)
    # For a preset these only restate what `from_preset` built; they refit a loaded config, and refuse overrides
    # that contradict the teacher.
    fixed = {
        "teacher_dim": (teacher_dim, "the teacher's feature size"),
        "encoder_config": {
            "image_size": (image_size, "--image_size"),
            "patch_size": (teacher_patch_size, "the teacher's patch size"),
        },
        "decoder_config": {
            # The decoder reads the grid of codes: one position per patch, `code_dim` channels each.
            "image_size": (grid, "--image_size / the teacher's patch size"),
            "patch_size": (1, "the decoder's design (one code per position)"),
            "num_channels": (code_dim, "code_dim"),
        },
    }
    return rebuild_config(base, merge_fixed(parsed, fixed))


def build_model(
    teacher: TeacherForPatchTargets,
    hub_kwargs: dict[str, Any],
    *,
    model_name_or_path: str | None,
    config_name: str,
    config_overrides: str | None,
    image_size: int | None,
) -> VQKDModel:
    """A fresh tokenizer shaped by the teacher (feature size, patch grid), or --model_name_or_path; checked."""
    if model_name_or_path:
        check_model_type(
            "--model_name_or_path",
            model_name_or_path,
            VQKDConfig.model_type,
            "run_vqkd.py",
            "VQKDModel saved by run_vqkd.py or convert_unilm_checkpoint.py --kind vqkd",
            hub_kwargs,
        )
        revision, token = hub_kwargs["revision"], hub_kwargs["token"]
        config = VQKDConfig.from_pretrained(model_name_or_path, revision=revision, token=token)
        updates = pretrained_config_updates(
            config, image_size=image_size, drop_path_rate=None, overrides=config_overrides
        )
        model = VQKDModel.from_pretrained(model_name_or_path, **updates, **hub_kwargs)
    else:
        config = vqkd_config(
            config_name,
            image_size=image_size or DEFAULT_IMAGE_SIZE,
            teacher_patch_size=teacher.patch_size,
            teacher_dim=teacher.feature_dim,
            overrides=config_overrides,
            hub_kwargs=hub_kwargs,
        )
        model = VQKDModel(config)
    teacher.check_compatible(model.config, model.image_size)
    return model


def teacher_targets(teach, pixel_values: torch.Tensor) -> torch.Tensor:
    # The teacher sees the same [0, 1] crop as the tokenizer; each applies its own normalisation.
    return teach(pixel_values.float())


def evaluate(accelerator, model, teach, dataloader) -> dict[str, float]:
    """`eval_reconstruction_cosine` (to the teacher), `eval_loss_quantization`, and the codebook usage and
    perplexity of the codes the held-out images get (eval mode: the codebook does not move)."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: ranks may hold different numbers of batches
    totals = torch.zeros(3, device=accelerator.device)  # per-image sums of cosine and quantization loss, images
    code_counts = torch.zeros(model.config.codebook_size, device=accelerator.device)
    model.eval()
    for batch in dataloader:
        pixel_values = to_device(batch, accelerator.device)["pixel_values"]
        with torch.no_grad(), accelerator.autocast():
            outputs = model(pixel_values=pixel_values, teacher_features=teacher_targets(teach, pixel_values))
        one = torch.ones((), device=accelerator.device)
        values = [1 - outputs.reconstruction_loss.float(), outputs.quantization_loss.float(), one]
        totals += torch.stack(values) * pixel_values.shape[0]
        code_counts += torch.bincount(outputs.codebook_indices.flatten(), minlength=code_counts.numel())
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    code_counts = accelerator.reduce(code_counts, reduction="sum")
    probabilities = code_counts / code_counts.sum().clamp(min=1)
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum()
    cosine, quantization, num_images = totals.tolist()
    return {
        "eval_reconstruction_cosine": cosine / max(num_images, 1),
        "eval_loss_quantization": quantization / max(num_images, 1),
        "eval_codebook_usage": (code_counts > 0).float().mean().item(),
        "eval_perplexity": math.exp(entropy.item()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the final loop state (`step`, `num_nonfinite_steps`, `stop_reason`, `last_metrics`)."""
    model_args, data_args, args = parse_arguments((VQKDModelArguments, DataArguments, VQKDTrainingArguments), argv)
    repo_id = check_hub_access(args.push_to_hub, args.hub_model_id, args.output_dir, args.token)
    accelerator = build_accelerator(
        output_dir=args.output_dir,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_grad_norm=args.max_grad_norm,
        report_to=args.report_to,
        seed=args.seed,
    )
    hub_kwargs = {"revision": args.model_revision, "token": args.token, "trust_remote_code": args.trust_remote_code}
    with outside_zero3(accelerator):
        teacher = load_with_flag(
            "--teacher_name_or_path",
            model_args.teacher_name_or_path,
            lambda: TeacherForPatchTargets.from_pretrained(model_args.teacher_name_or_path, **hub_kwargs),
        )
    model = build_model(
        teacher,
        hub_kwargs,
        model_name_or_path=model_args.model_name_or_path,
        config_name=model_args.config_name,
        config_overrides=model_args.config_overrides,
        image_size=model_args.image_size,
    )
    teacher.to(accelerator.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    processor = VQKDImageProcessor(image_size=model.image_size)

    min_shards = accelerator.num_processes * max(1, data_args.dataloader_num_workers)  # every worker gets data
    train_data, image_column, eval_data, eval_column = load_datasets(
        data_args.sources(), min_shards=min_shards, do_eval=args.do_eval, seed=args.seed
    )
    transform = image_transform(processor, augment=True)
    dataloader = training_dataloader(
        accelerator,
        train_data,
        image_column,
        transform,
        batch_size=args.per_device_train_batch_size,
        num_workers=data_args.dataloader_num_workers,
        seed=args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        max_samples=data_args.max_train_samples,
    )
    eval_dataloader = None
    if eval_data is not None and eval_column is not None:  # both or neither
        transform = image_transform(processor, augment=False)
        eval_dataloader = evaluation_dataloader(
            accelerator,
            eval_data,
            eval_column,
            transform,
            batch_size=args.per_device_eval_batch_size,
            num_workers=data_args.dataloader_num_workers,
            seed=args.seed,
            max_samples=data_args.max_eval_samples,
        )
    learning_rate = resolve_learning_rate(
        args.learning_rate,
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        paper_lr=PAPER_LEARNING_RATE,
        paper_batch=PAPER_BATCH_SIZE,
        min_learning_rate=args.min_learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
    )
    total_batch = total_batch_size(
        args.per_device_train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes
    )
    num_examples = stream_size(train_data, data_args.dataset_split, data_args.max_train_samples)
    num_training_steps = resolve_training_steps(args.max_steps, args.num_train_epochs, num_examples, total_batch)
    optimizer = build_optimizer(
        model,
        learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        args.lr_scheduler_type,
        num_training_steps=num_training_steps,
        warmup_steps=args.warmup_steps,
        min_learning_rate=args.min_learning_rate,
    )
    if args.torch_compile:
        # The two ViTs, in place (parameter names and checkpoints unchanged). Not the quantizer: its EMA codebook
        # update writes in place during the forward, which compiled autograd refuses.
        model.encoder.compile()
        model.decoder.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    precision = resolve_frozen_model_precision(model_args.frozen_model_precision, args.mixed_precision, "teacher")
    teach = frozen_forward(teacher, accelerator, precision=precision, compile=args.torch_compile)

    identity = run_identity(
        model_config=accelerator.unwrap_model(model).config.to_dict(),
        frozen_model={
            "teacher (--teacher_name_or_path) class": type(teacher).__name__,
            "teacher (--teacher_name_or_path) weights": weights_fingerprint(teacher),
        },
        fixed={"seed": args.seed, **data_args.training_data_identity()},
        changeable={
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "mixed_precision": args.mixed_precision,
            "frozen_model_precision": precision,
        },
        changeable_config_keys=PRETRAINED_SETTINGS,
    )
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    # Refused differences leave the folder as it was: compared before prepare_output_dir sets anything aside.
    resume_changes = check_run_identity(checkpoint, identity, allow_changes=args.resume_allow_changes)
    prepare_output_dir(accelerator, args.output_dir, checkpoint)
    state: dict[str, Any] = {"step": 0, "num_nonfinite_steps": 0}
    if checkpoint is not None:
        loop_state, dataloader_state = load_checkpoint(
            accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler
        )
        state.update(loop_state)
        record_resume_changes(accelerator, args.output_dir, state["step"], resume_changes)
        resume_dataloader(dataloader, dataloader_state)
    batches = iter(dataloader)  # draws from the torch RNG, so it comes before the saved RNG states are restored
    if checkpoint is not None:
        restore_rng_states(accelerator, checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, state["step"])
    if args.report_to != "none":
        config = tracker_config(
            vars(model_args), vars(data_args), vars(args), learning_rate=learning_rate, steps=num_training_steps
        )
        accelerator.init_trackers("vqkd", config=config)
    logger.info("Training the tokenizer for %d steps against %s.", num_training_steps, model_args.teacher_name_or_path)

    stop, guard = StopSignal(), NonFiniteGuard(accelerator, optimizer, state["num_nonfinite_steps"])
    window = MetricsWindow(accelerator, args.output_dir, data_args.dataloader_num_workers)
    progress = tqdm(total=num_training_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    stop_reason, last_metrics = None, {}
    model.train()
    while state["step"] < num_training_steps and stop_reason is None:
        pixel_values = to_device(window.next_batch(batches), accelerator.device)["pixel_values"]
        with accelerator.accumulate(model):
            outputs = model(pixel_values=pixel_values, teacher_features=teacher_targets(teach, pixel_values))
            if guard.allows_backward(outputs.loss):
                accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                grad_norm = gradient_norm(accelerator, model, args.max_grad_norm)
                guard.check(grad_norm)  # a non-finite norm makes the optimizer skip this update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        metrics = {name: getattr(outputs, field) for name, field in VQKD_METRICS.items()}
        window.add(metrics, valid=torch.isfinite(outputs.loss.detach()))
        if not accelerator.sync_gradients:
            continue  # the rest happens once per optimizer step

        state["step"] += 1
        scheduler.step()
        progress.update(1)
        window.add({"grad_norm": grad_norm})
        step = state["step"]
        is_logging_step = step % args.logging_steps == 0 or step == num_training_steps
        if is_logging_step:  # the only host-device syncs of the loop
            state["num_nonfinite_steps"] = int(guard.num_nonfinite_steps.item())
            counts = sum_over_ranks(accelerator, image_counts(dataloader))
            extra = {"lr": scheduler.get_last_lr()[0], **counts, "num_nonfinite_steps": state["num_nonfinite_steps"]}
            last_metrics = window.log(step, extra)
            state["consecutive_nonfinite"] = guard.longest_run()
            if state["consecutive_nonfinite"] >= args.max_consecutive_nonfinite:
                stop_reason = "nonfinite"
        if stop_reason is None:
            stop_reason = stop.requested(accelerator, is_logging_step)  # the signal's name, or None
        if eval_dataloader is not None and (
            step == num_training_steps or (args.eval_steps and step % args.eval_steps == 0)
        ):
            eval_metrics = evaluate(accelerator, model, teach, eval_dataloader)
            write_record(accelerator, window.path, {"step": step, **eval_metrics})
            last_metrics = {**last_metrics, **eval_metrics}
        if (args.save_steps and step % args.save_steps == 0) or stop_reason or step == num_training_steps:
            state["num_nonfinite_steps"] = int(guard.num_nonfinite_steps.item())
            save_checkpoint(
                accelerator,
                args.output_dir,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                loop_state=state,
                dataloader_state=dataloader.state_dict(),
                image_processor=processor,
                save_total_limit=args.save_total_limit,
                weights_are_finite=stop_reason != "nonfinite",
                run_identity=identity,
            )

    progress.close()
    stop.restore()
    try:  # a refused export (non-finite weights) still ends the trackers and the process group
        if state["step"] == num_training_steps and stop_reason != "nonfinite":  # also when a signal came at the end
            export_model(
                accelerator,
                model,
                processor,
                args.output_dir,
                card_kind="vqkd",
                card_fields={  # sizes, codebook and preset: from the saved config
                    "teacher": hub_reference(model_args.teacher_name_or_path),
                    "base_model": hub_reference(model_args.model_name_or_path),
                },
                dataset_name=data_args.dataset_name,
                training_card={
                    "steps": num_training_steps,
                    "total_batch_size": total_batch,
                    "peak_learning_rate": learning_rate,
                    **args.card_settings(),
                },
                last_metrics=last_metrics,
                license=args.license,
                hub_model_id=args.hub_model_id,
                repo_id=repo_id,
                token=args.token,
            )
    finally:
        del model, optimizer, scheduler, dataloader, batches, eval_dataloader, guard  # see end_training
        end_training(accelerator)
    return final_state({**state, "last_metrics": last_metrics}, stop_reason, num_training_steps, args.output_dir)


if __name__ == "__main__":
    sys.exit(PREEMPTED_EXIT_CODE if main()["preempted"] else 0)
