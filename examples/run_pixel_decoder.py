#!/usr/bin/env python
"""Give BEiT v2's visual tokens back their pixels: train a `VQKDPixelDecoder` on a frozen VQ-KD tokenizer.

    accelerate launch --config_file examples/configs/ddp.yaml examples/run_pixel_decoder.py \\
        --dataset_name timm/imagenet-1k-wds --tokenizer_name_or_path path/to/vqkd \\
        --output_dir vqkd-pixel-decoder --per_device_train_batch_size 128 --max_steps 50000 --bf16 \\
        --do_eval --validation_split validation --max_eval_samples 5000 --dataloader_num_workers 12

The tokenizer is frozen, in eval mode, kept out of `prepare()` and never saved: the decoder holds a copy of its
l2-normalised codebook and decodes on its own. Each step tokenizes the tokenizer's [0, 1] view of a batch of
images (RandomResizedCrop + flip, the tokenizer's own training view) and regresses those pixels from the codes.
Defaults follow MAE's recipe for regressing pixels with a Transformer: AdamW betas (0.9, 0.95), weight decay 0.05,
peak lr 1.5e-4 at batch 256 (scaled linearly to the total batch unless --learning_rate is given), 5% warmup then
per-step cosine to 1e-5.

With --do_eval the held-out images are scored against a baseline that needs no network: every patch painted with
the mean patch of its code over (up to --baseline_images of) the training images. `eval_psnr` (the decoder) and
`eval_baseline_psnr` go to `metrics.jsonl`, the returned `last_metrics` and the model card.

The training loop is `main()`: copy this file to change the loss or add an evaluation.
Exit status: 0 when the run finished, `pretraining.loop.PREEMPTED_EXIT_CODE` (75) when SIGTERM/SIGINT stopped it before its
last step (a checkpoint was saved: relaunch with --resume_from_checkpoint latest).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_beitv2 import VQKDModel, VQKDPixelDecoder, VQKDPixelDecoderConfig
from pretraining.arguments import (
    FROZEN_MODEL_PRECISIONS,
    PRETRAINED_SETTINGS,
    DataArguments,
    PretrainingArguments,
    check_choice,
    check_hub_access,
    check_range,
    frozen_model_precision_field,
    parse_arguments,
    parse_config_overrides,
    resolve_frozen_model_precision,
    square_side,
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
    end_training,
    export_model,
    final_state,
    frozen_forward,
    gradient_norm,
    load_visual_tokenizer,
    outside_zero3,
    resolve_learning_rate,
    resolve_training_steps,
    sum_over_ranks,
    total_batch_size,
    tracker_config,
    write_record,
)
from pretraining.pixel_baseline import MeanPatchBaseline, psnr
from processing import VQKDImageProcessor

logger = logging.getLogger(__name__)

# MAE's base learning rate for a pixel-regressing Transformer (He et al., 2021): 1.5e-4 per 256 images.
DEFAULT_LEARNING_RATE, DEFAULT_BATCH_SIZE = 1.5e-4, 256
# The tokenizer's settings, which the decoder copies and --config_overrides may not change.
TOKENIZER_SETTINGS = ("codebook_size", "code_dim", "image_size", "patch_size")


@dataclass
class PixelDecoderModelArguments:
    tokenizer_name_or_path: str = field(
        metadata={"help": "The frozen VQ-KD tokenizer (a folder saved by run_vqkd.py, or a Hub id)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value for the decoder (hidden_size, num_hidden_layers, num_attention_heads, "
            "intermediate_size, refine_channels, loss_type=mse|l1, ...); the tokenizer's settings "
            f"({', '.join(TOKENIZER_SETTINGS)}) are copied from it."
        },
    )
    frozen_model_precision: str = frozen_model_precision_field("tokenizer")

    def __post_init__(self):
        check_choice("frozen_model_precision", self.frozen_model_precision, FROZEN_MODEL_PRECISIONS)


@dataclass
class PixelDecoderTrainingArguments(PretrainingArguments):
    weight_decay: float = field(default=0.05)
    adam_beta2: float = field(default=0.95)
    warmup_steps: float = field(default=0.05, metadata={"help": "Steps, or a fraction of the training steps."})
    baseline_images: int = field(
        default=10_000,
        metadata={
            "help": "With --do_eval: the mean-patch baseline averages the [0, 1] patches of each code over the first "
            "this many training images (evaluation view, all ranks together). eval_psnr and eval_baseline_psnr are "
            "the PSNR (dB, [0, 1] pixels) of each held-out image, averaged over the images."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_range("baseline_images", self.baseline_images, low=1)


def build_model(config_overrides: str | None, tokenizer: VQKDModel) -> VQKDPixelDecoder:
    """A new decoder for `tokenizer`, sized by --config_overrides (checked against the decoder's config keys)."""
    overrides = parse_config_overrides(config_overrides, VQKDPixelDecoderConfig())
    return VQKDPixelDecoder.from_tokenizer(tokenizer, **overrides)


def fit_baseline(accelerator, tokenize, tokenizer: VQKDModel, dataloader) -> MeanPatchBaseline:
    """The mean patch of every code over the images of `dataloader` (this rank's share), summed over all ranks."""
    baseline = MeanPatchBaseline(
        tokenizer.codebook_size,
        square_side(tokenizer.config.encoder_vit.patch_size),
        tokenizer.patch_grid,
        device=accelerator.device,
    )
    for batch in dataloader:
        pixel_values = to_device(batch, accelerator.device)["pixel_values"]
        baseline.update(pixel_values, tokenize(pixel_values))
    baseline.all_reduce(accelerator)
    logger.info(
        "Mean-patch baseline: %d patches, %d of %d codes seen (the others get the global mean patch).",
        baseline.num_patches,
        baseline.num_seen_codes,
        tokenizer.codebook_size,
    )
    return baseline


def evaluate(accelerator, model, tokenize, dataloader, baseline: MeanPatchBaseline) -> dict[str, float]:
    """`eval_loss` (the training loss) and the PSNR of the decoder and of the mean-patch baseline, each computed per
    held-out image on [0, 1] pixels and averaged over the images."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: ranks may hold different numbers of batches
    totals = torch.zeros(4, device=accelerator.device)  # per-image sums of loss, PSNR, baseline PSNR; images
    model.eval()
    for batch in dataloader:
        pixel_values = to_device(batch, accelerator.device)["pixel_values"]
        codes = tokenize(pixel_values)
        with torch.no_grad(), accelerator.autocast():
            outputs = model(input_ids=codes, pixel_values=pixel_values)
        num_images = pixel_values.shape[0]
        totals[0] += outputs.loss.float() * num_images
        totals[1] += psnr(outputs.reconstruction, pixel_values).sum()
        totals[2] += psnr(baseline.paint(codes), pixel_values).sum()
        totals[3] += num_images
    model.train()
    loss, decoder_psnr, baseline_psnr, num_images = accelerator.reduce(totals, reduction="sum").tolist()
    num_images = max(num_images, 1)
    return {
        "eval_loss": loss / num_images,
        "eval_psnr": decoder_psnr / num_images,
        "eval_baseline_psnr": baseline_psnr / num_images,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the final loop state (`step`, `num_nonfinite_steps`, `stop_reason`, `last_metrics`)."""
    model_args, data_args, args = parse_arguments(
        (PixelDecoderModelArguments, DataArguments, PixelDecoderTrainingArguments), argv
    )
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
        hint = "the pixel decoder reads VQ-KD codes"
        tokenizer = load_visual_tokenizer(model_args.tokenizer_name_or_path, (VQKDModel,), hint, **hub_kwargs)
        tokenizer.to(accelerator.device)
    model = build_model(model_args.config_overrides, tokenizer)
    processor = VQKDImageProcessor(image_size=tokenizer.image_size)

    min_shards = accelerator.num_processes * max(1, data_args.dataloader_num_workers)  # every worker gets data
    train_data, image_column, eval_data, eval_column = load_datasets(
        data_args.sources(), min_shards=min_shards, do_eval=args.do_eval, seed=args.seed
    )
    dataloader = training_dataloader(
        accelerator,
        train_data,
        image_column,
        image_transform(processor, augment=True),
        batch_size=args.per_device_train_batch_size,
        num_workers=data_args.dataloader_num_workers,
        seed=args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        max_samples=data_args.max_train_samples,
    )
    eval_dataloader = baseline_dataloader = None
    if eval_data is not None and eval_column is not None:  # both or neither
        transform = image_transform(processor, augment=False)
        held_out = {
            "batch_size": args.per_device_eval_batch_size,
            "num_workers": data_args.dataloader_num_workers,
            "seed": args.seed,
        }
        eval_dataloader = evaluation_dataloader(
            accelerator, eval_data, eval_column, transform, max_samples=data_args.max_eval_samples, **held_out
        )
        # The first --baseline_images training images, in their evaluation view (one ordered pass, no shuffle).
        baseline_dataloader = evaluation_dataloader(
            accelerator, train_data, image_column, transform, max_samples=args.baseline_images, **held_out
        )
    learning_rate = resolve_learning_rate(
        args.learning_rate,
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        paper_lr=DEFAULT_LEARNING_RATE,
        paper_batch=DEFAULT_BATCH_SIZE,
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
        model.compile()  # in place: parameter names, checkpoints and save_pretrained stay those of the model
    model, optimizer = accelerator.prepare(model, optimizer)
    tokenize = frozen_forward(
        tokenizer.get_codebook_indices,
        accelerator,
        precision=resolve_frozen_model_precision(model_args.frozen_model_precision, args.mixed_precision, "tokenizer"),
        compile=args.torch_compile,
    )

    identity = run_identity(
        model_config=accelerator.unwrap_model(model).config.to_dict(),
        frozen_model={
            "tokenizer (--tokenizer_name_or_path) class": type(tokenizer).__name__,
            "tokenizer (--tokenizer_name_or_path) weights": weights_fingerprint(tokenizer),
        },
        fixed={"seed": args.seed, **data_args.training_data_identity()},
        changeable={
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "mixed_precision": args.mixed_precision,
            "frozen_model_precision": resolve_frozen_model_precision(
                model_args.frozen_model_precision, args.mixed_precision, "tokenizer"
            ),
        },
        changeable_config_keys=PRETRAINED_SETTINGS,
    )
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    # Refused differences leave the folder as it was (and fit no baseline): compared before anything else.
    resume_changes = check_run_identity(checkpoint, identity, allow_changes=args.resume_allow_changes)
    # Computed on every launch, resumed ones included: it reads the same images in the same order, so it is the same.
    baseline = (
        None if baseline_dataloader is None else fit_baseline(accelerator, tokenize, tokenizer, baseline_dataloader)
    )

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
        accelerator.init_trackers("vqkd-pixel-decoder", config=config)
    logger.info(
        "Training the pixel decoder for %d steps on tokenizer %s.",
        num_training_steps,
        model_args.tokenizer_name_or_path,
    )

    stop, guard = StopSignal(), NonFiniteGuard(accelerator, optimizer, state["num_nonfinite_steps"])
    window = MetricsWindow(accelerator, args.output_dir, data_args.dataloader_num_workers)
    progress = tqdm(total=num_training_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    stop_reason, last_metrics = None, {}
    model.train()
    while state["step"] < num_training_steps and stop_reason is None:
        pixel_values = to_device(window.next_batch(batches), accelerator.device)["pixel_values"]
        with accelerator.accumulate(model):
            outputs = model(input_ids=tokenize(pixel_values), pixel_values=pixel_values)
            if guard.allows_backward(outputs.loss):
                accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                grad_norm = gradient_norm(accelerator, model, args.max_grad_norm)
                guard.check(grad_norm)  # a non-finite norm makes the optimizer skip this update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.add({"loss": outputs.loss}, valid=torch.isfinite(outputs.loss.detach()))
        if not accelerator.sync_gradients:
            continue  # the rest happens once per optimizer step

        state["step"] += 1
        scheduler.step()
        progress.update(1)
        window.add({"grad_norm": grad_norm})
        step = state["step"]
        is_logging_step = step % args.logging_steps == 0 or step == num_training_steps
        if is_logging_step:  # the only host-device syncs of the loop besides the decoder's check of the codes
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
            assert baseline is not None  # fitted whenever there is held-out data
            eval_metrics = evaluate(accelerator, model, tokenize, eval_dataloader, baseline)
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
            tokenizer_name = model_args.tokenizer_name_or_path
            export_model(
                accelerator,
                model,
                processor,
                args.output_dir,
                card_kind="pixel_decoder",
                card_fields={
                    # The card's snippet loads the tokenizer from `base_model`: only a Hub id, never a local folder.
                    "base_model": None if Path(tokenizer_name).exists() else tokenizer_name,
                    "source_note": f"Trained on the frozen VQ-KD tokenizer `{tokenizer_name}`.",
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
        del (
            model,
            optimizer,
            scheduler,
            dataloader,
            batches,
            eval_dataloader,
            baseline_dataloader,
            guard,
        )  # end_training
        end_training(accelerator)
    return final_state({**state, "last_metrics": last_metrics}, stop_reason, num_training_steps, args.output_dir)


if __name__ == "__main__":
    sys.exit(PREEMPTED_EXIT_CODE if main()["preempted"] else 0)
