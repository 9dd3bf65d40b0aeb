"""What the pretraining scripts (`run_vqkd.py`, `run_mim.py`, `run_pixel_decoder.py`) call around the training loop
of their `main()`: set-up (accelerator, frozen models, optimizer, learning-rate schedule), what the loop watches
(non-finite steps, stop signals, metrics), and the export at the end. Nothing here calls a script back."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from huggingface_hub import HfApi
from transformers import AutoModel, PretrainedConfig, get_scheduler
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from modeling_beitv2 import DVAEModel, VQKDModel
from pretraining.arguments import LR_SCHEDULER_CHOICES, MIN_LR_SCHEDULERS, check_choice, check_range, check_report_to
from pretraining.checkpoints import (
    CHECKPOINT_PREFIX,
    EXPORT_PREVIOUS,
    EXPORT_TEMPORARY,
    FEATURE_EXTRACTOR_DIR,
    METRICS_FILE,
    ExportWriteError,
    list_checkpoints,
    nonfinite_tensors,
    on_any_rank,
    resume_advice,
    write_export,
)
from pretraining.model_cards import CardKind, write_model_card

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): a signal stopped the run before its last step, after a checkpoint; schedulers requeue on it.
PREEMPTED_EXIT_CODE = 75


def build_accelerator(
    *,
    output_dir: str,
    mixed_precision: str,
    gradient_accumulation_steps: int,
    per_device_train_batch_size: int,
    max_grad_norm: float | None,
    report_to: str,
    seed: int,
) -> Accelerator:
    """An Accelerator with the run's trackers (checked to be installed), logging set up, the seed set, and the world
    size printed by every rank so that a launch that silently trains alone shows."""
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=check_report_to(report_to),
        project_dir=output_dir,
    )
    logging.basicConfig(
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
        force=True,
    )
    print(
        f"[rank {accelerator.process_index}] world size {accelerator.num_processes}, distributed type "
        f"{accelerator.distributed_type.value}, device {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision}",
        flush=True,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The DataLoader is not prepared (it is already sharded per rank), so Accelerate cannot infer these; an
        # explicit value in the DeepSpeed JSON wins over the arguments.
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (
            ("train_micro_batch_size_per_gpu", per_device_train_batch_size),
            ("gradient_clipping", max_grad_norm or 0.0),
        ):
            config[key] = value if config.get(key, "auto") == "auto" else config[key]
    set_seed(seed)
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


_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_forward(
    function: Callable[..., Any], accelerator: Accelerator, *, precision: str, compile: bool
) -> Callable[..., Any]:
    """`function` (a frozen model's forward, e.g. `tokenizer.get_codebook_indices`) without gradients, under
    `precision`'s autocast ("fp16" / "bf16"; "fp32": none), compiled when `compile`. Accelerate autocasts only
    prepared models, and in fp32 the tokenizer costs as much as the training step on a GPU; VQ-KD's nearest-code
    search stays fp32 inside the model whatever the autocast."""
    if compile:
        function = torch.compile(function)
    device_type, dtype = accelerator.device.type, _AUTOCAST_DTYPES[precision]

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return function(*args, **kwargs)

    return run


def build_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_weight_decay_names: Iterable[str] = ("cls_token", "position_embeddings"),
    layer_id: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups with `params`, `names` and `weight_decay`, one per (`layer_id(name)`,
    decayed or not), in that order; `finetuning.param_groups` gives each layer its own learning rate.

    No weight decay goes to 1-D parameters (norms, layer scales), biases, and any parameter whose name ends with one
    of `no_weight_decay_names`.
    """
    no_decay_suffixes = (".bias", *no_weight_decay_names)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip_decay = param.ndim <= 1 or name.endswith(no_decay_suffixes)
            key = (layer_id(name) if layer_id else 0, skip_decay)
            group = groups.setdefault(
                key, {"params": [], "names": [], "weight_decay": 0.0 if skip_decay else weight_decay}
            )
            group["params"].append(param)
            group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: torch.nn.Module, learning_rate: float, *, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups`, fused when every parameter is on a CPU or CUDA device: the fastest
    kernel on GPUs, and it honours `optimizer.found_inf` (see :class:`NonFiniteGuard`)."""
    groups = [
        {"params": group["params"], "weight_decay": group["weight_decay"]}
        for group in build_param_groups(model, weight_decay)
    ]
    fused = {param.device.type for group in groups for param in group["params"]} <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


def gradient_norm(
    accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float | None
) -> torch.Tensor | None:
    """The total norm of the (already all-reduced, so the same on every rank) gradients as a device tensor, clipped
    to `max_grad_norm` when it is set and not 0 (0 disables clipping, as in transformers' TrainingArguments). None
    under DeepSpeed without clipping (its engine owns the gradients)."""
    if max_grad_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        return None if norm is None else torch.as_tensor(norm, device=accelerator.device)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    accelerator.unscale_gradients()  # fp16: measure the true gradients, not the loss-scaled ones
    return torch.nn.utils.get_total_norm([param.grad for param in model.parameters() if param.grad is not None])


def tracker_config(*settings: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The run's settings (mappings, e.g. `vars()` of the parsed arguments, then `extra`) for `init_trackers`, as
    TensorBoard's hparams take them; the Hub token is left out."""
    config = {key: value for mapping in settings for key, value in mapping.items() if key != "token"}
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in {**config, **extra}.items()
    }


class NonFiniteWeightsError(RuntimeError):
    """The run reached its end with weights holding NaN or inf: nothing is exported and the script exits 1."""


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    image_processor: Any,
    output_dir: str,
    *,
    card_kind: CardKind,
    card_fields: dict[str, Any],
    dataset_name: str | None,
    training_card: dict[str, Any],
    last_metrics: dict[str, Any],
    license: str | None,
    hub_model_id: str | None,
    repo_id: str | None,
    token: str | None,
    write_extra: Callable[[Path], None] | None = None,
) -> None:
    """`save_pretrained` of the model and its image processor in `output_dir`, a model card (`card_fields`, the
    training settings of `training_card` and the evaluation metrics of `last_metrics`), and the Hub upload to
    `repo_id` (what `check_hub_access` returned; None: no upload). Every rank calls it: under ZeRO-3 the weights are
    gathered first. `write_extra(folder)` (main process) adds to the export after the model is saved in `folder`,
    inside the same write-aside (run_mim.py's native feature extractor).

    Raises:
        NonFiniteWeightsError: the weights hold NaN or inf; nothing is written (a previous export stays as it was).
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    nonfinite = nonfinite_tensors(state_dict)  # every rank gets the same gathered weights, so the same verdict
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (", ..." if len(nonfinite) > 5 else "")
        raise NonFiniteWeightsError(
            f"The final weights are not finite ({len(nonfinite)} tensors hold NaN/inf: {shown}); the model was not "
            f"exported (a previous export in {output_dir}, if any, is untouched); {resume_advice(output_dir)}."
        )
    card_id = repo_id or hub_model_id  # the id it will be uploaded to (or was named for later upload)
    unwrapped = accelerator.unwrap_model(model)

    def write(folder: Path) -> None:
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        image_processor.save_pretrained(folder)
        write_model_card(
            folder,
            card_kind,
            config=unwrapped.config,
            hub_model_id=card_id,  # never the local folder
            license=license,
            **card_fields,
            model_name=card_id.split("/")[-1] if card_id else Path(output_dir).resolve().name,  # not the staging one
            datasets=[dataset_name] if dataset_name else [],
            training_args=training_card,
            metrics={key: value for key, value in last_metrics.items() if key != "step"},
        )
        if write_extra is not None:
            write_extra(folder)

    failure = None
    if accelerator.is_main_process:
        checkpoints = list_checkpoints(output_dir)
        try:
            write_export(output_dir, write, checkpoints[-1] if checkpoints else None)
        except ExportWriteError as error:
            failure = error
    if on_any_rank(accelerator, failure is not None):  # every rank raises, none waits for the others
        raise failure or ExportWriteError(f"The main process could not write the final model to {output_dir}.")
    if accelerator.is_main_process:
        logger.info("Saved the model and its image processor in %s", output_dir)
        if repo_id is not None:
            HfApi(token=token).upload_folder(
                repo_id=repo_id,
                folder_path=output_dir,
                # The native feature extractor is a repo of its own (widgets read a repo's root).
                ignore_patterns=[
                    f"{CHECKPOINT_PREFIX}*",
                    f".tmp-{CHECKPOINT_PREFIX}*",
                    "abandoned-*",
                    EXPORT_TEMPORARY,
                    EXPORT_PREVIOUS,
                    f"{FEATURE_EXTRACTOR_DIR}/*",
                ],
                commit_message="Upload model trained with beitv2-hf",
            )
            logger.info("Pushed %s to the Hub as %s", output_dir, repo_id)
    accelerator.wait_for_everyone()


def final_state(state: dict[str, Any], stop_reason: str | None, num_training_steps: int, output_dir: str) -> dict:
    """`state` plus `stop_reason` (None, "nonfinite" or the signal's name) and `preempted` (a signal stopped the run
    before its last step: exit with :data:`PREEMPTED_EXIT_CODE`). A non-finite stop raises a RuntimeError."""
    if stop_reason == "nonfinite":
        raise RuntimeError(
            f"Stopped at step {state['step']}: {state['consecutive_nonfinite']} consecutive steps had a non-finite "
            f"loss or gradient ({state['num_nonfinite_steps']} in all). A checkpoint was saved in {output_dir}; "
            f"{resume_advice(output_dir)}."
        )
    if stop_reason is not None:
        logger.warning("Stopped by %s at step %d after saving a checkpoint.", stop_reason, state["step"])
    preempted = stop_reason is not None and state["step"] < num_training_steps
    return {**state, "stop_reason": stop_reason, "preempted": preempted}


def end_training(accelerator: Accelerator) -> None:
    """Forget the prepared objects, then stop the trackers and the process group; callers first `del` their own
    references to the prepared model, optimizer and DataLoader. Under gloo, a DDP wrapper that outlives the process
    group makes the group's destructor join gloo's workers while holding the GIL a worker needs to free its last work
    item: that deadlock hung about one 2-rank CPU run in ten with torch 2.13."""
    # Private, but Accelerate has no public accessor for the models `prepare()` wrapped.
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


# ---------------------------------------------------------------------------------------------------------------------
# Frozen visual tokenizers

VisualTokenizer = VQKDModel | DVAEModel


def load_with_flag(flag: str, name_or_path: str, load: Callable[[], Any]) -> Any:
    """``load()`` of the model ``flag`` names; a location that does not exist or cannot be read is one line naming
    the flag and the value (not a Hub repo-id traceback)."""
    expanded = os.path.expanduser(name_or_path)
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if (looks_local or os.path.exists(expanded)) and not os.path.isdir(expanded):
        # transformers would read it as a Hub repo id and answer with a message about repo ids
        what = (
            "is a file, not a model folder" if os.path.exists(expanded) else "no such folder (and not a Hub repo id)"
        )
        raise ValueError(f"{flag} {name_or_path}: {what}.")
    try:
        return load()
    except OSError as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(f"{flag} {name_or_path}: {first_line}") from error


def check_model_type(
    flag: str, name_or_path: str, expected_model_type: str, script: str, hint: str, hub_kwargs: dict[str, Any]
) -> None:
    """Refuse a ``flag`` (``--model_name_or_path``) whose saved config is of another model type before anything is
    built: transformers only logs a warning and fills the missing keys with this model's defaults."""
    hub = {key: hub_kwargs[key] for key in ("revision", "token") if key in hub_kwargs}
    config_dict, _ = load_with_flag(flag, name_or_path, lambda: PretrainedConfig.get_config_dict(name_or_path, **hub))
    model_type = config_dict.get("model_type")
    if model_type != expected_model_type:
        raise ValueError(
            f"{flag} {name_or_path} is a {model_type!r} model; {script} continues a {hint} "
            f"(model type {expected_model_type!r})."
        )


_TokenizerT = TypeVar("_TokenizerT", bound=VisualTokenizer)


@overload
def load_visual_tokenizer(
    name_or_path: str,
    expected: tuple[type[_TokenizerT], ...],
    hint: str = "",
    flag: str = "--tokenizer_name_or_path",
    **hub_kwargs: Any,
) -> _TokenizerT: ...


@overload
def load_visual_tokenizer(
    name_or_path: str,
    expected: tuple[type[VQKDModel] | type[DVAEModel], ...] = ...,
    hint: str = "",
    flag: str = "--tokenizer_name_or_path",
    **hub_kwargs: Any,
) -> VisualTokenizer: ...


def load_visual_tokenizer(
    name_or_path: str,
    expected: tuple[type[Any], ...] = (VQKDModel, DVAEModel),
    hint: str = "",
    flag: str = "--tokenizer_name_or_path",
    **hub_kwargs: Any,
) -> VisualTokenizer:  # `expected` is typed by the overloads: the result is of the classes it lists
    """The tokenizer at `name_or_path` (`AutoModel.from_pretrained` with `hub_kwargs`) in eval mode without
    gradients; a model of another class raises with `hint`, an unreadable location raises naming `flag`."""
    tokenizer = load_with_flag(flag, name_or_path, lambda: AutoModel.from_pretrained(name_or_path, **hub_kwargs))
    if not isinstance(tokenizer, expected):
        names = " or ".join(kind.__name__ for kind in expected)
        raise ValueError(
            f"{name_or_path!r} is a {type(tokenizer).__name__}; expected a {names}{f' ({hint})' if hint else ''}."
        )
    return tokenizer.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Learning rate and step counts


def total_batch_size(per_device_batch_size: int, gradient_accumulation_steps: int, num_processes: int) -> int:
    """Examples per optimizer step over all processes: per-device batch x accumulation x processes."""
    check_range("num_processes", num_processes, low=1)
    return per_device_batch_size * gradient_accumulation_steps * num_processes


def resolve_learning_rate(
    learning_rate: float | None,
    *,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    num_processes: int,
    paper_lr: float,
    paper_batch: int,
    min_learning_rate: float,
    lr_scheduler_type: str,
) -> float:
    """``--learning_rate``, or the paper's peak lr scaled linearly from its batch size to the total batch; logged.

    Warns when it is not above ``--min_learning_rate``: a small total batch scales the paper's lr down so far (1.5e-3
    at 2048 -> 5.9e-6 at 8) that a short run learns nothing, and the min-lr schedules then stay flat.
    """
    batch = total_batch_size(per_device_batch_size, gradient_accumulation_steps, num_processes)
    origin, advice = "--learning_rate", "raise --learning_rate or lower --min_learning_rate"
    if learning_rate is None:
        learning_rate = paper_lr * batch / paper_batch
        origin = f"the paper's {paper_lr:.3g} at batch {paper_batch} scaled linearly to the total batch {batch}"
        advice = "pass --learning_rate or use a larger total batch"
    logger.info(
        "Peak learning rate %.3g (%s; %d per device x %d accumulation steps x %d processes).",
        learning_rate,
        origin,
        per_device_batch_size,
        gradient_accumulation_steps,
        num_processes,
    )
    if learning_rate <= min_learning_rate:
        flat = (
            f", so the {lr_scheduler_type} schedule stays flat at it" if lr_scheduler_type in MIN_LR_SCHEDULERS else ""
        )
        logger.warning(
            "The peak learning rate %.3g (%s) is not above --min_learning_rate %.3g%s: a short run at this lr "
            "learns next to nothing; %s.",
            learning_rate,
            origin,
            min_learning_rate,
            flat,
            advice,
        )
    return learning_rate


def resolve_training_steps(max_steps: int, num_train_epochs: float, num_examples: int | None, total_batch: int) -> int:
    """``max_steps`` when positive, else ``num_train_epochs`` of ``num_examples`` at ``total_batch`` examples per
    step (at least one step); a ValueError when epochs are asked for a stream of unknown size."""
    if max_steps > 0:
        return max_steps
    if num_examples is None:
        raise ValueError(
            "The number of training examples is unknown for this stream, so --num_train_epochs "
            f"{num_train_epochs} cannot be turned into steps; give --max_steps."
        )
    return max(1, math.ceil(num_train_epochs * max(1, num_examples // total_batch)))


def resolve_warmup_steps(warmup_steps: float, num_training_steps: int) -> int:
    """``--warmup_steps`` in optimizer steps: as is when >= 1, else a fraction of ``num_training_steps`` rounded up
    (as transformers does). Warns when the warmup does not end before training does."""
    warmup = int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * num_training_steps)
    if warmup >= num_training_steps:
        logger.warning(
            "The warmup (%d steps) lasts the whole run (%d steps): the peak learning rate is never passed. "
            "Give --warmup_steps as a fraction below 1 (e.g. 0.05) to scale it with the run.",
            warmup,
            num_training_steps,
        )
    return warmup


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    lr_scheduler_type: str,
    *,
    num_training_steps: int,
    warmup_steps: float,
    min_learning_rate: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' ``get_scheduler(lr_scheduler_type)``, stepped once per optimizer step, with
    :func:`resolve_warmup_steps` of warmup. The min-lr schedules end at ``min_learning_rate`` as a fraction of the
    optimizer's default lr, so every parameter group ends at the same fraction of its own lr; a min lr above the
    peak gives a flat schedule."""
    check_choice("lr_scheduler_type", lr_scheduler_type, LR_SCHEDULER_CHOICES)
    peak = optimizer.defaults["lr"]
    min_lr_rate = min(min_learning_rate, peak) / peak
    return get_scheduler(
        lr_scheduler_type,
        optimizer,
        num_warmup_steps=resolve_warmup_steps(warmup_steps, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs={"min_lr_rate": min_lr_rate} if lr_scheduler_type in MIN_LR_SCHEDULERS else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# What the loop watches while it runs

# Above this fraction of a logging window spent waiting for the next batch, the GPU idles for the input pipeline.
DATA_WAIT_WARNING_FRACTION = 0.1


class NonFiniteGuard:
    """Skips every optimizer update whose gradients are not finite, and counts such steps, without a per-step sync.

    A non-finite gradient norm sets `found_inf` on the fused AdamW, which then leaves the weights, its moments and its
    step count untouched (the mechanism of `torch.amp.GradScaler`); the counters stay on the device. Without a fused
    AdamW the gradients are dropped instead (a sync). Under DeepSpeed, whose engine steps inside `backward`,
    :meth:`allows_backward` checks the loss on every rank first (a sync per micro-batch).
    """

    def __init__(self, accelerator: Accelerator, optimizer: torch.optim.Optimizer, num_nonfinite_steps: int = 0):
        self.accelerator = accelerator
        # The torch optimizer inside Accelerate's wrapper.
        self.optimizer: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.fused = not self.deepspeed and bool(self.optimizer.defaults.get("fused"))
        device = accelerator.device
        self.num_nonfinite_steps = torch.tensor(num_nonfinite_steps, device=device)
        self.consecutive = torch.zeros((), device=device)  # the current run of non-finite steps
        self.longest = torch.zeros((), device=device)  # the longest run since the last read
        self.skipped_backward = torch.zeros((), device=device)  # DeepSpeed: a micro-batch of this cycle was skipped

    def allows_backward(self, loss: torch.Tensor) -> bool:
        """False when the loss is not finite on some rank under DeepSpeed; always True otherwise (no sync)."""
        if self.deepspeed and on_any_rank(self.accelerator, not torch.isfinite(loss.detach()).all().item()):
            self.skipped_backward.fill_(1.0)
            return False
        return True

    def check(self, grad_norm: torch.Tensor | None) -> None:
        """At the end of an accumulation cycle: arm the optimizer to skip this update if `grad_norm` is not finite
        (or DeepSpeed skipped a backward), and count the step."""
        found_inf = self.skipped_backward.clone()
        self.skipped_backward.zero_()
        if grad_norm is not None:
            found_inf = torch.maximum(found_inf, (~torch.isfinite(grad_norm)).float())
        if self.fused:
            # torch's Optimizer does not declare it: fused AdamW reads it with getattr(self, "found_inf", None).
            self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        elif not self.deepspeed and found_inf.item():
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        self.num_nonfinite_steps = self.num_nonfinite_steps + found_inf.long()
        self.consecutive = (self.consecutive + 1) * found_inf
        self.longest = torch.maximum(self.longest, self.consecutive)

    def longest_run(self) -> int:
        """The longest run of consecutive non-finite steps since the last call (a sync)."""
        longest = int(self.longest.item())
        self.longest = self.consecutive.clone()
        return longest


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag that the loop reads, so that it saves a checkpoint and exits: after the current
    step in a single process; with several, at the next logging step, where the ranks exchange metrics anyway."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, accelerator: Accelerator, is_logging_step: bool) -> str | None:
        """The signal's name when the loop must stop now (on every rank at once), else None."""
        if accelerator.num_processes == 1:
            return self.received
        if not is_logging_step or not on_any_rank(accelerator, self.received is not None):
            return None
        return self.received or "a signal to another rank"

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class MetricsWindow:
    """The metrics of one logging window, kept on the device until :meth:`log` reduces them in one all-reduce.

    Averages over the window: the model's metrics over micro-batches with a finite loss, `grad_norm` over optimizer
    steps with a finite norm. Also `images_per_second` (all ranks) and `data_wait_fraction`, the share of the
    window's wall time spent waiting for the next batch; two windows in a row above 10% give a warning.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str, num_workers: int) -> None:
        self.accelerator = accelerator
        self.num_workers = num_workers  # named in the slow-input warning
        self.path = Path(output_dir) / METRICS_FILE
        self.slow_windows = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.num_images, self.data_wait, self.started = 0, 0.0, time.perf_counter()

    def next_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        waited_from = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - waited_from
        self.num_images += next(iter(batch.values())).shape[0]
        return batch

    def add(self, metrics: dict[str, torch.Tensor | None], valid: torch.Tensor | None = None) -> None:
        """Add scalar device tensors (None values are skipped); those where `valid` is False are left out."""
        for name, value in metrics.items():
            if value is not None:
                value = value.detach().float()
                keep = torch.isfinite(value) if valid is None else valid
                self.sums[name] = self.sums.get(name, 0) + torch.where(keep, value, 0.0)
                self.counts[name] = self.counts.get(name, 0) + keep.float()

    def log(self, step: int, extra: dict[str, float | int]) -> dict[str, Any]:
        """Reduce the window over all ranks (one sync), write it with `extra`, and start a new window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        names = list(self.sums)  # the same on every rank, in the same order
        stacked = torch.stack([self.sums[name] for name in names] + [self.counts[name] for name in names])
        totals = self.accelerator.reduce(stacked, reduction="sum").tolist()
        record: dict[str, Any] = {"step": step}
        for name, total, count in zip(names, totals, totals[len(names) :], strict=False):
            if count > 0:  # nothing finite to average: leave the name out
                record[name] = total / count
        data_wait_fraction = self.data_wait / elapsed
        images_per_second = self.num_images * self.accelerator.num_processes / elapsed
        record.update(extra, images_per_second=images_per_second, data_wait_fraction=data_wait_fraction)
        self.slow_windows = self.slow_windows + 1 if data_wait_fraction > DATA_WAIT_WARNING_FRACTION else 0
        if self.slow_windows == 2:
            logger.warning(
                "The loop waited for data %.0f%% of the last two logging windows: the input pipeline limits the "
                "speed. Raise --dataloader_num_workers (now %s per process) if the machine has spare CPU cores.",
                100 * data_wait_fraction,
                self.num_workers,
            )
        write_record(self.accelerator, self.path, record)
        self._reset()
        return record


def write_record(accelerator: Accelerator, path: Path, record: dict[str, Any]) -> None:
    """Append `record` to `metrics.jsonl` and the log (main process), and give it to the trackers."""
    if accelerator.is_main_process:
        with path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        logger.info("step %d: %s", record["step"], ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
    accelerator.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])


def sum_over_ranks(accelerator: Accelerator, values: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over all ranks (a collective: every rank must call it)."""
    tensor = torch.tensor(list(values.values()), device=accelerator.device, dtype=torch.long)
    return dict(zip(values, accelerator.reduce(tensor, reduction="sum").tolist(), strict=True))
