#!/usr/bin/env python
"""Stage 2 of BEiT v2 (or BEiT v1): masked image modeling against a frozen visual tokenizer, with Accelerate.

    accelerate launch --config_file examples/configs/ddp.yaml examples/run_mim.py \\
        --dataset_name timm/imagenet-1k-wds --tokenizer_name_or_path path/to/vqkd \\
        --config_name base --num_masking_patches 75 --output_dir beitv2-base --per_device_train_batch_size 128 \\
        --max_steps 187500 --bf16 --dataloader_num_workers 12 --torch_compile

Defaults follow the paper (appendix E, ViT-B 300 epochs): AdamW betas (0.9, 0.98), weight decay 0.05, peak lr
1.5e-3 at batch 2048 (scaled linearly to the total batch unless --learning_rate is given), warmup 10 of 300
epochs then per-step cosine to 1e-5, gradient clipping at 3.0, blockwise masking of 40% of the patches. The
tokenizer (VQ-KD, or the DALL-E dVAE with --beit_v1) is frozen, in eval mode, kept out of `prepare()` and never
saved with the checkpoints. Under --bf16/--fp16 it tokenizes under fp16 autocast (--frozen_model_precision).

The training loop is `main()`: copy this file to change the loss, add an EMA or another evaluation.
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

from modeling_beitv2 import (
    BEITV2_PRESETS,
    BeitV2Config,
    BeitV2ForMaskedImageModeling,
    DVAEModel,
    VQKDModel,
    convert_to_native_feature_extractor,
)
from modeling_beitv2.attention import BEIT_FLEX_ATTENTION
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
    square_side,
)
from pretraining.checkpoints import (
    FEATURE_EXTRACTOR_DIR,
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
    VisualTokenizer,
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    check_model_type,
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
from pretraining.model_cards import hub_reference, write_model_card
from processing import BeitV2ImageProcessor
from processing.evaluation import evaluation_image_processor

logger = logging.getLogger(__name__)

PAPER_LEARNING_RATE, PAPER_BATCH_SIZE = 1.5e-3, 2048
# The model's own names, logged as they are (the reference logs them as loss_1, loss_2, mlm_acc_1, mlm_acc_2).
ATTENTION_CHOICES = ("eager", "sdpa", BEIT_FLEX_ATTENTION)
MIM_METRICS = ("loss", "loss_mim", "mim_accuracy", "loss_aggregation", "aggregation_accuracy")


@dataclass
class MIMModelArguments:
    tokenizer_name_or_path: str = field(
        metadata={"help": "Frozen tokenizer: a VQ-KD (BEiT v2) or dVAE (BEiT v1, with --beit_v1) name or path."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue from a saved MIM model."})
    config_name: str | None = field(
        default=None,
        metadata={
            "help": f"Backbone preset ({', '.join(sorted(BEITV2_PRESETS))}) or a config name/path (default: base); "
            "not with --model_name_or_path, whose saved config is used."
        },
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value, e.g. 'hidden_size=32,num_hidden_layers=4'."}
    )
    image_size: int | None = image_size_field()
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
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": f"Attention of the trained model: {', '.join(ATTENTION_CHOICES)} (default: the model's)."},
    )
    frozen_model_precision: str = frozen_model_precision_field("tokenizer")

    def __post_init__(self):
        if self.model_name_or_path and self.config_name is not None:
            raise ValueError(
                f"--config_name {self.config_name} is ignored with --model_name_or_path {self.model_name_or_path} (the "
                "saved config is used): pass one of them; --config_overrides may still change drop path and dropout."
            )
        check_range("mask_ratio", self.mask_ratio, low=0, high=1, low_inclusive=False, high_inclusive=False)
        # --num_masking_patches is checked once, by the mask generator, against the patch grid it must fit in.
        check_range("drop_path_rate", self.drop_path_rate, low=0, high=1, high_inclusive=False)
        check_range("image_size", self.image_size, low=1)
        check_choice("frozen_model_precision", self.frozen_model_precision, FROZEN_MODEL_PRECISIONS)
        if self.attn_implementation not in (None, *ATTENTION_CHOICES):
            raise ValueError(
                f"--attn_implementation must be one of {', '.join(ATTENTION_CHOICES)}; got {self.attn_implementation!r}."
            )


@dataclass
class MIMTrainingArguments(PretrainingArguments):
    weight_decay: float = field(default=0.05)
    adam_beta2: float = field(default=0.98, metadata={"help": "0.98 for 300 epochs, 0.999 for 1600 (paper)."})
    warmup_steps: float = field(default=10 / 300, metadata={"help": "Steps, or a fraction (paper: 10 of 300 epochs)."})
    max_grad_norm: float | None = field(default=3.0, metadata={"help": "Clip gradients to this norm (0: off)."})


def load_tokenizer(name_or_path: str, beit_v1: bool, hub_kwargs: dict[str, Any]) -> VisualTokenizer:
    """The frozen tokenizer, checked against the BEiT version chosen by --beit_v1."""
    if beit_v1:
        return load_visual_tokenizer(name_or_path, (DVAEModel,), "--beit_v1 needs a DVAEModel", **hub_kwargs)
    hint = "BEiT v2 needs a VQKDModel, or pass --beit_v1"
    return load_visual_tokenizer(name_or_path, (VQKDModel,), hint, **hub_kwargs)


def mim_config(
    config_name: str,
    *,
    image_size: int,
    vocab_size: int,
    overrides: str | None,
    drop_path_rate: float | None,
    beit_v1: bool,
    hub_kwargs: dict[str, Any],
) -> BeitV2Config:
    """The `BeitV2Config` of a new model: the `BEITV2_PRESETS` preset or the `beitv2` config (Hub id or folder)
    `config_name` names, with `overrides` (`--config_overrides`) applied and the settings the other arguments decide
    (the tokenizer's codebook size as `vocab_size`, no patch aggregation for `beit_v1`) fixed.

    Raises:
        ValueError: an unknown `config_name` or a config of another model type, a bad override or one that
            contradicts the other arguments, or a config that fails `BeitV2Config`'s checks.
    """
    base = named_config(config_name, BeitV2Config, BEITV2_PRESETS, {}, hub_kwargs)
    fixed: dict[str, Any] = {
        "image_size": (image_size, "--image_size"),
        "vocab_size": (vocab_size, "the tokenizer's codebook size"),
    }
    if beit_v1:
        fixed["use_patch_aggregation"] = (False, "--beit_v1")
    if drop_path_rate is not None:
        fixed["drop_path_rate"] = (float(drop_path_rate), "--drop_path_rate")
    return rebuild_config(base, merge_fixed(parse_config_overrides(overrides, base), fixed))


def build_model(
    tokenizer: VisualTokenizer,
    hub_kwargs: dict[str, Any],
    *,
    model_name_or_path: str | None,
    config_name: str | None,
    config_overrides: str | None,
    image_size: int | None,
    drop_path_rate: float | None,
    beit_v1: bool,
    attn_implementation: str | None,
) -> BeitV2ForMaskedImageModeling:
    """A fresh model from --config_name (+ overrides), or --model_name_or_path with what may change for it (drop
    path); either way checked against the tokenizer's codebook and patch grid."""
    if model_name_or_path:
        check_model_type(
            "--model_name_or_path",
            model_name_or_path,
            BeitV2Config.model_type,
            "run_mim.py",
            "BeitV2ForMaskedImageModeling saved by run_mim.py or convert_unilm_checkpoint.py --kind beitv2_pretrain",
            hub_kwargs,
        )
        revision, token = hub_kwargs["revision"], hub_kwargs["token"]
        config = BeitV2Config.from_pretrained(model_name_or_path, revision=revision, token=token)
        updates = pretrained_config_updates(
            config, image_size=image_size, drop_path_rate=drop_path_rate, overrides=config_overrides
        )
        attention: dict[str, Any] = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = BeitV2ForMaskedImageModeling.from_pretrained(model_name_or_path, **updates, **attention, **hub_kwargs)
    else:
        config = mim_config(
            config_name or "base",
            image_size=image_size or DEFAULT_IMAGE_SIZE,
            vocab_size=tokenizer.codebook_size,
            overrides=config_overrides,
            drop_path_rate=drop_path_rate,
            beit_v1=beit_v1,
            hub_kwargs=hub_kwargs,
        )
        # The constructor, not `_from_config`: under ZeRO-3 that one initialises inside `deepspeed.zero.Init`, with
        # other random draws than a plain run.
        model = BeitV2ForMaskedImageModeling(config)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    config = model.config
    if config.vocab_size != tokenizer.codebook_size:
        raise ValueError(
            f"The model predicts {config.vocab_size} classes but the tokenizer has {tokenizer.codebook_size} codes."
        )
    if tuple(config.patch_grid) != tuple(tokenizer.patch_grid):
        raise ValueError(
            f"The model's patch grid {tuple(config.patch_grid)} differs from the tokenizer's "
            f"{tuple(tokenizer.patch_grid)}; the labels must cover the same patches."
        )
    return model


def build_image_processor(
    model_config: BeitV2Config,
    tokenizer: VisualTokenizer,
    *,
    mask_ratio: float,
    num_masking_patches: int | None,
    beit_v1: bool,
) -> BeitV2ImageProcessor:
    """The processor of both views; its mask generator checks --num_masking_patches against the patch grid."""
    settings: dict[str, Any] = {
        "image_size": square_side(model_config.image_size),
        "patch_size": square_side(model_config.patch_size),
        "mask_ratio": mask_ratio,
        "num_masking_patches": num_masking_patches,
        "tokenizer_image_size": tokenizer.image_size,
    }
    return BeitV2ImageProcessor.for_beit_v1(**settings) if beit_v1 else BeitV2ImageProcessor(**settings)


def evaluate(accelerator, model, tokenize, dataloader, num_masking_patches: int) -> dict[str, float]:
    """`eval_loss`, `eval_loss_mim`, `eval_mim_accuracy` (and the aggregation head's) over the held-out images."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: ranks may hold different numbers of batches
    names = [name for name in MIM_METRICS if model.config.use_patch_aggregation or "aggregation" not in name]
    totals = torch.zeros(len(names) + 1, device=accelerator.device)  # per-image sums, then the image count
    model.eval()
    for batch in dataloader:
        batch = to_device(batch, accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            outputs = model(
                pixel_values=batch["pixel_values"],
                bool_masked_pos=batch["bool_masked_pos"],
                labels=tokenize(batch["tokenizer_pixel_values"]),
                num_masked_patches=num_masking_patches,
            )
        values = [outputs[name].float() for name in names] + [torch.ones((), device=accelerator.device)]
        totals += torch.stack(values) * batch["pixel_values"].shape[0]
    model.train()
    totals = accelerator.reduce(totals, reduction="sum").tolist()
    return {f"eval_{name}": total / max(totals[-1], 1) for name, total in zip(names, totals, strict=False)}


def export_feature_extractor(
    output_dir: str | Path, image_processor: Any, *, hub_model_id: str | None, license: str | None
) -> Path:
    """Save the backbone of the MIM model saved in `output_dir` (read back from there, so that weights partitioned by
    ZeRO-3 arrive whole) as a native transformers `BeitModel` in `output_dir/feature-extraction/`, with a native
    `BeitImageProcessor` of the same evaluation view (shorter side to `image_size`, centre crop, the processor's
    mean/std) and a model card. `export_model` calls it on its staging folder, so the folder is written aside and
    swapped in with the rest of the export.

    Hosted inference widgets run no custom code; this folder needs none, so `pipeline("image-feature-extraction")`
    works on it, on the Hub too (upload it as its own repo). Its `pooler_output` (`pool=True`) is the linear probe's
    representation when the model has the patch-aggregation head ([CLS] after the final LayerNorm); without the head
    native `beit` has no matching pooler and `pool=True` gives [CLS] (a warning says so). Returns the folder."""
    folder = Path(output_dir) / FEATURE_EXTRACTOR_DIR
    model = BeitV2ForMaskedImageModeling.from_pretrained(output_dir)
    native = convert_to_native_feature_extractor(model)
    native.save_pretrained(folder)
    evaluation_image_processor(
        image_processor.image_size, tuple(image_processor.image_mean), tuple(image_processor.image_std), crop_pct=1.0
    ).save_pretrained(folder)
    write_model_card(
        folder,
        "feature_extractor",
        config=native.config,
        hub_model_id=f"{hub_model_id}-{FEATURE_EXTRACTOR_DIR}" if hub_model_id else None,
        license=license,
        base_model=hub_model_id,
        family="beitv2" if model.config.use_patch_aggregation else "beit",
    )
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the final loop state (`step`, `num_nonfinite_steps`, `stop_reason`, `last_metrics`)."""
    model_args, data_args, args = parse_arguments((MIMModelArguments, DataArguments, MIMTrainingArguments), argv)
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
        tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, model_args.beit_v1, hub_kwargs).to(
            accelerator.device
        )
    model = build_model(
        tokenizer,
        hub_kwargs,
        model_name_or_path=model_args.model_name_or_path,
        config_name=model_args.config_name,
        config_overrides=model_args.config_overrides,
        image_size=model_args.image_size,
        drop_path_rate=model_args.drop_path_rate,
        beit_v1=model_args.beit_v1,
        attn_implementation=model_args.attn_implementation,
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    processor = build_image_processor(
        model.config,
        tokenizer,
        mask_ratio=model_args.mask_ratio,
        num_masking_patches=model_args.num_masking_patches,
        beit_v1=model_args.beit_v1,
    )
    num_masking_patches = processor.mask_generator.num_masking_patches  # exact per image: a static shape

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
            "mask_ratio": processor.mask_ratio,
            "num_masking_patches": num_masking_patches,
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
        accelerator.init_trackers("beitv1-mim" if model_args.beit_v1 else "beitv2-mim", config=config)
    logger.info(
        "Masked image modeling (%s) for %d steps with tokenizer %s.",
        "BEiT v1" if model_args.beit_v1 else "BEiT v2",
        num_training_steps,
        model_args.tokenizer_name_or_path,
    )

    stop, guard = StopSignal(), NonFiniteGuard(accelerator, optimizer, state["num_nonfinite_steps"])
    window = MetricsWindow(accelerator, args.output_dir, data_args.dataloader_num_workers)
    progress = tqdm(total=num_training_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    stop_reason, last_metrics = None, {}
    model.train()
    while state["step"] < num_training_steps and stop_reason is None:
        batch = to_device(window.next_batch(batches), accelerator.device)
        with accelerator.accumulate(model):
            labels = tokenize(batch["tokenizer_pixel_values"])
            outputs = model(
                pixel_values=batch["pixel_values"],
                bool_masked_pos=batch["bool_masked_pos"],
                labels=labels,
                num_masked_patches=num_masking_patches,
            )
            if guard.allows_backward(outputs.loss):
                accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                grad_norm = gradient_norm(accelerator, model, args.max_grad_norm)
                guard.check(grad_norm)  # a non-finite norm makes the optimizer skip this update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.add({name: getattr(outputs, name) for name in MIM_METRICS}, valid=torch.isfinite(outputs.loss.detach()))
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
            eval_metrics = evaluate(accelerator, model, tokenize, eval_dataloader, num_masking_patches)
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

    def write_feature_extractor(folder: Path) -> None:
        with outside_zero3(accelerator):  # read back whole, not partitioned across ranks
            export_feature_extractor(folder, processor, hub_model_id=args.hub_model_id, license=args.license)

    try:  # a refused export (non-finite weights) still ends the trackers and the process group
        if state["step"] == num_training_steps and stop_reason != "nonfinite":  # also when a signal came at the end
            export_model(
                accelerator,
                model,
                processor,
                args.output_dir,
                card_kind="mim",
                card_fields={"base_model": hub_reference(model_args.model_name_or_path)},  # sizes: from the config
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
                write_extra=write_feature_extractor,
            )
            logger.info(
                "Saved the backbone as a native transformers BeitModel for feature extraction in %s",
                Path(args.output_dir) / FEATURE_EXTRACTOR_DIR,
            )
    finally:
        del model, optimizer, scheduler, dataloader, batches, eval_dataloader, guard  # see end_training
        end_training(accelerator)
    return final_state({**state, "last_metrics": last_metrics}, stop_reason, num_training_steps, args.output_dir)


if __name__ == "__main__":
    sys.exit(PREEMPTED_EXIT_CODE if main()["preempted"] else 0)
