"""Set-up and wrap-up helpers for the pretraining scripts (`run_mim.py`, `run_vqkd.py`, `run_pixel_decoder.py`); the
loops live in the scripts.

Accelerator setup, the per-image transform and the data loaders, AdamW, the ZeRO-3 context for frozen models,
frozen forwards under autocast, the gradient norm, and the end of a run (final state, export of the model, image
processor and card, Hub upload). What the loop watches while it runs (non-finite updates, stop signals, metrics
windows) is in :mod:`loop_monitors`.
Nothing here calls the scripts back: copy a script and change its loop freely.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from checkpoint_folders import CHECKPOINT_PREFIX
from data_sources import load_image_stream, split_off_validation
from dataloader_state import build_dataloader
from datasets.distributed import split_dataset_by_node
from huggingface_hub import HfApi
from image_datasets import ImageStream, decode_or_skip, new_decode_counts
from param_groups import build_param_groups
from pretraining_arguments import DataArguments, PretrainingArguments
from schedules import total_batch_size
from startup_checks import check_report_to
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from model_cards import write_model_card
from processing import DataCollatorForMaskedImageModeling

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h ("temporary failure; the user is invited to retry"): the exit status of a run stopped
# by SIGTERM/SIGINT before its last step, after saving a checkpoint. Schedulers can requeue on it and the next
# launch resumes with --resume_from_checkpoint latest. A finished run exits 0, a signal on the last step included.
PREEMPTED_EXIT_CODE = 75
# The training settings a model card shows, besides the step count, total batch and peak learning rate.
CARD_SETTINGS = (
    "lr_scheduler_type", "min_learning_rate", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "max_grad_norm", "mixed_precision", "seed",
)  # fmt: skip


def build_accelerator(args: PretrainingArguments) -> Accelerator:
    """An Accelerator with the run's trackers (checked to be installed), logging set up, the seed set, and the world
    size printed by every rank so that a launch that silently trains alone shows."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=check_report_to(args.report_to),
        project_dir=args.output_dir,
    )
    logging.basicConfig(
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
        force=True,
    )
    rank, world_size, distributed_type = (
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.distributed_type,
    )
    print(f"[rank {rank}] world size {world_size}, distributed type {distributed_type.value}, device "
          f"{accelerator.device}, mixed precision {accelerator.mixed_precision}", flush=True)  # fmt: skip
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The DataLoader is not prepared (it is already sharded per rank), so Accelerate cannot infer these; an
        # explicit value in the DeepSpeed JSON wins over the arguments.
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (
            ("train_micro_batch_size_per_gpu", args.per_device_train_batch_size),
            ("gradient_clipping", args.max_grad_norm or 0.0),
        ):
            config[key] = value if config.get(key, "auto") == "auto" else config[key]
    set_seed(args.seed)
    return accelerator


@contextlib.contextmanager
def outside_zero3(accelerator: Accelerator) -> Iterator[None]:
    """Context for loading a frozen model (teacher, tokenizer) that is never passed to `prepare()`: under ZeRO-3,
    `from_pretrained` would partition its weights across ranks, and DeepSpeed would never gather them back."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


FROZEN_MODEL_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_tokenizer_precision(requested: str, mixed_precision: str) -> str:
    """The frozen visual tokenizer's autocast for `--frozen_model_precision` (`requested`) under the run's
    `mixed_precision`. Its outputs are discrete codes, so agreement with fp32 is what counts: with fp16's 10-bit
    mantissa the codes of a base-size VQ-KD tokenizer equal fp32's on 99.9% of patches, with bf16's 7 bits on 98.5%
    (`benchmarks/bench_tokenizer_precision.py`), at the same speed; the official engine tokenizes under fp16 autocast
    too. So "auto" is fp16 under any mixed precision, fp32 otherwise; an explicit choice wins."""
    if requested != "auto":
        return requested
    return "fp32" if mixed_precision == "no" else "fp16"


def frozen_forward(
    function: Callable[..., Any], accelerator: Accelerator, *, precision: str, compile: bool
) -> Callable[..., Any]:
    """`function` (a frozen model's forward, e.g. `tokenizer.get_codebook_indices`) without gradients, under
    `precision`'s autocast ("fp16" / "bf16"; "fp32": none), compiled when `compile`. Accelerate autocasts only
    prepared models, and in fp32 the tokenizer costs as much as the training step on a GPU; VQ-KD's nearest-code
    search stays fp32 inside the model whatever the autocast."""
    if precision not in _AUTOCAST_DTYPES and precision != "fp32":
        raise ValueError(f"precision must be one of fp32, fp16, bf16; got {precision!r}.")
    if compile:
        function = torch.compile(function)
    device_type, dtype = accelerator.device.type, _AUTOCAST_DTYPES.get(precision)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return function(*args, **kwargs)

    return run


def image_transform(processor: Any, augment: bool) -> Callable[[Any, np.random.Generator], dict[str, np.ndarray]]:
    """`(image, rng) -> model inputs` for the data loaders: `processor.preprocess` of one image (with its training
    augmentation when `augment`, else the evaluation view), every random draw (crops, flips, MIM masks) from the
    example's own generator `rng`, keeping `processor.model_input_names` without the batch dimension."""
    augmentation = processor.training_augmentation() if augment else None

    def transform(image: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        features = processor.preprocess(image, augmentation=augmentation, rng=rng, return_tensors="np")
        return {name: features[name][0] for name in processor.model_input_names}

    return transform


def load_datasets(accelerator: Accelerator, data_args: DataArguments, args: PretrainingArguments) -> tuple:
    """The training dataset, its image column, the held-out dataset (None without `--do_eval`) and its image column.

    The held-out images come from `--validation_dir`, `--validation_split` of the training source, or a
    `--train_val_split` fraction split off the training data (the same split on every rank, without reading images).
    Local sources are split into at least ranks x workers shards so that every DataLoader worker gets data.
    """
    min_shards = accelerator.num_processes * max(1, data_args.dataloader_num_workers)
    source = {"image_column_name": data_args.image_column_name, "streaming": data_args.streaming}
    source.update(cache_dir=data_args.cache_dir, min_shards=min_shards)
    train_files = (data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.data_files)
    train, image_column = load_image_stream(*train_files, split=data_args.dataset_split, **source)
    evaluation, eval_column = None, None
    if args.do_eval and data_args.validation_dir is not None:
        evaluation, eval_column = load_image_stream(train_dir=data_args.validation_dir, **source)
    elif args.do_eval and data_args.validation_split is not None:
        evaluation, eval_column = load_image_stream(*train_files, split=data_args.validation_split, **source)
    elif args.do_eval:
        train, evaluation = split_off_validation(train, data_args.train_val_split, args.seed)
        eval_column = image_column
    return train, image_column, evaluation, eval_column


def stream_size(dataset, split: str, max_samples: int | None) -> int | None:
    """Examples per epoch if the dataset's metadata or `max_samples` says, else None."""
    splits = getattr(dataset.info, "splits", None) or {}
    known = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return known if max_samples is None else min(known or max_samples, max_samples)


def training_dataloader(
    accelerator: Accelerator, dataset, image_column: str, transform: Callable, data_args: DataArguments,
    args: PretrainingArguments,
) -> StatefulDataLoader:  # fmt: skip
    """This rank's share of `dataset` through `transform` (`(image, rng) -> model inputs`), shuffled, endless and
    resumable exactly (a torchdata `StatefulDataLoader`), pinned on CUDA."""
    stream = ImageStream(
        dataset,
        image_column,
        transform,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        max_samples=data_args.max_train_samples,
    )
    pin_memory = accelerator.device.type == "cuda"
    return build_dataloader(stream, args.per_device_train_batch_size, data_args.dataloader_num_workers, pin_memory)


class HeldOutImages(torch.utils.data.IterableDataset):
    """One ordered pass over this rank's share of the held-out images (the first `max_samples`), unusable images
    skipped and logged. The transform's random draws (MIM masks) depend only on the position, so every evaluation of a run sees
    the same inputs and the results are comparable."""

    def __init__(self, dataset, image_column: str, transform: Callable, rank: int, world_size: int, seed: int,
                 max_samples: int | None) -> None:  # fmt: skip
        super().__init__()
        dataset = dataset if max_samples is None else dataset.take(max_samples)
        # In DataLoader workers, `datasets` splits the rank's shards between the workers itself.
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.image_column, self.transform, self.rank, self.seed = image_column, transform, rank, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = 0 if worker is None else worker.id
        counts = new_decode_counts()  # per pass: each evaluation logs the held-out images it skips
        for index, example in enumerate(self.dataset):
            image = decode_or_skip(example[self.image_column], counts)
            if image is not None:
                yield dict(self.transform(image, np.random.default_rng([self.seed, self.rank, worker_id, index])))


def evaluation_dataloader(
    accelerator: Accelerator, dataset, image_column: str, transform: Callable, data_args: DataArguments,
    args: PretrainingArguments,
) -> torch.utils.data.DataLoader:  # fmt: skip
    """A DataLoader over :class:`HeldOutImages` (`--per_device_eval_batch_size`, `--max_eval_samples`): each
    iteration is one evaluation pass."""
    rank, world_size, max_samples = accelerator.process_index, accelerator.num_processes, data_args.max_eval_samples
    images = HeldOutImages(dataset, image_column, transform, rank, world_size, args.seed, max_samples)
    num_workers = min(data_args.dataloader_num_workers, images.dataset.num_shards)
    pin = accelerator.device.type == "cuda"
    return torch.utils.data.DataLoader(
        images,
        args.per_device_eval_batch_size,
        num_workers=num_workers,
        collate_fn=DataCollatorForMaskedImageModeling(),  # the training loader's collator
        pin_memory=pin,
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Batches come from pinned memory on CUDA, so the copies overlap with the computation.
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def build_optimizer(
    model: torch.nn.Module,
    args: PretrainingArguments,
    learning_rate: float,
    no_weight_decay_names: tuple[str, ...] = ("cls_token", "position_embeddings"),
) -> torch.optim.AdamW:
    """AdamW over the reference's no-weight-decay groups, fused when every parameter is on a CPU or CUDA device:
    the fastest kernel on GPUs, and it honours `optimizer.found_inf` (see :class:`loop_monitors.NonFiniteGuard`)."""
    groups = build_param_groups(model, args.weight_decay, no_weight_decay_names=no_weight_decay_names)
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in groups]
    devices = {param.device.type for group in groups for param in group["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(
        groups,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused or None,
    )


def gradient_norm(
    accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float | None
) -> torch.Tensor | None:
    """The total norm of the (already all-reduced, so the same on every rank) gradients as a device tensor, clipped
    to `max_grad_norm` when it is set. None under DeepSpeed without clipping (its engine owns the gradients)."""
    if max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        return None if norm is None else torch.as_tensor(norm, device=accelerator.device)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    accelerator.unscale_gradients()  # fp16: measure the true gradients, not the loss-scaled ones
    return torch.nn.utils.get_total_norm([param.grad for param in model.parameters() if param.grad is not None])


def tracker_config(*arguments: Any, **extra: Any) -> dict[str, Any]:
    """The run's settings (dataclasses, then `extra`) for `init_trackers`, as TensorBoard's hparams take them."""
    config = {key: value for instance in arguments for key, value in vars(instance).items() if key != "token"}
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in {**config, **extra}.items()
    }


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    args: PretrainingArguments,
    data_args: DataArguments,
    image_processor: Any,
    *,
    learning_rate: float,
    num_training_steps: int,
    last_metrics: dict[str, Any],
    card_kind: str,
    card_fields: dict[str, Any],
    repo_id: str | None,
) -> None:
    """`save_pretrained` of the model and its image processor in `--output_dir`, a model card, and the Hub upload
    to `repo_id` (what `check_hub_access` returned; None: no upload). Every rank calls it: under ZeRO-3 the weights
    are gathered first."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir, state_dict=state_dict)
        image_processor.save_pretrained(args.output_dir)
        fields = {
            **card_fields,
            "datasets": [data_args.dataset_name] if data_args.dataset_name else [],
            "training_args": {
                "steps": num_training_steps,
                "total_batch_size": total_batch_size(args, accelerator.num_processes),
                "peak_learning_rate": learning_rate,
                **{key: getattr(args, key) for key in CARD_SETTINGS},
            },
            "metrics": {key: value for key, value in last_metrics.items() if key != "step"},
        }
        write_model_card(
            args.output_dir,
            card_kind,
            config=accelerator.unwrap_model(model).config,
            # The id it will be uploaded to (or was named for later upload); never the local folder.
            hub_model_id=repo_id or args.hub_model_id,
            license=args.license,
            **fields,
        )
        logger.info("Saved the model and its image processor in %s", args.output_dir)
        if repo_id is not None:
            HfApi(token=args.token).upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f".tmp-{CHECKPOINT_PREFIX}*", "abandoned-*"],
                commit_message="Upload model trained with beitv2-hf",
            )
            logger.info("Pushed %s to the Hub as %s", args.output_dir, repo_id)
    accelerator.wait_for_everyone()


def final_state(state: dict[str, Any], stop_reason: str | None, num_training_steps: int, output_dir: str) -> dict:
    """`state` plus `stop_reason` (None, "nonfinite" or the signal's name) and `preempted` (a signal stopped the run
    before its last step: exit with :data:`PREEMPTED_EXIT_CODE`). A non-finite stop raises a RuntimeError."""
    if stop_reason == "nonfinite":
        raise RuntimeError(
            f"Stopped at step {state['step']}: {state['consecutive_nonfinite']} consecutive steps had a non-finite "
            f"loss or gradient ({state['num_nonfinite_steps']} in all). A checkpoint was saved in {output_dir}; lower "
            "the learning rate, enable --max_grad_norm or switch fp16 to bf16, then --resume_from_checkpoint latest."
        )
    preempted = stop_reason is not None and state["step"] < num_training_steps
    if stop_reason is not None:
        logger.warning("Stopped by %s at step %d after saving a checkpoint.", stop_reason, state["step"])
    return {**state, "stop_reason": stop_reason, "preempted": preempted}


def end_training(accelerator: Accelerator) -> None:
    """Forget the prepared objects, then stop the trackers and the process group.

    Callers must first drop their own references to the prepared model, optimizer and DataLoader (`del model, ...`).
    The order matters under gloo: a DDP wrapper that outlives the process group holds its last reference, and the
    group's destructor then joins gloo's worker threads while holding the GIL; a worker freeing its last work item
    needs the GIL too. That deadlock hung about one 2-rank CPU run in ten with torch 2.13.
    """
    models = [weakref.ref(model) for model in accelerator._models]
    accelerator.free_memory()  # forgets the prepared objects and runs gc.collect
    alive = [model() for model in models if model() is not None]
    if alive and accelerator.num_processes > 1:
        logger.warning(
            "The prepared model is still referenced while the process group is destroyed; with gloo this can "
            "hang at exit. Referrers: %s",
            [type(referrer).__name__ for referrer in gc.get_referrers(alive[0])],
        )
    del alive
    accelerator.end_training()
