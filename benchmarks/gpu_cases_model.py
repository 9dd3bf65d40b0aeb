"""bench_gpu.py's ``mim`` and ``tokenizer`` sections: our models' training step and the frozen tokenizer.

``mim`` times one MIM training step (forward, backward, fused AdamW) of ours, with patch aggregation on and off, for
every attention implementation, eager and compiled, and of transformers' `BeitForMaskedImageModeling`; ``tokenizer``
times VQ-KD's `get_codebook_indices` in fp32, TF32, bf16 and fp16 (and compiled), with the agreement of its codes
with fp32's. The models and inputs built here are also those of the ``official`` and ``scripts`` sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from gpu_common import TINY_VIT, Bench, Sizes
from gpu_timing import autocast, count_flops, dynamo_graph_count, free_memory, peak_gib, tf32_matmuls, time_steps
from torch import nn

import modeling_beitv2
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling, VQKDConfig, VQKDModel
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

DEFAULT_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def mim_config(sizes: Sizes, use_patch_aggregation: bool, attn_implementation: str | None = None) -> BeitV2Config:
    overrides = dict(sizes.mim_overrides, image_size=sizes.image_size, use_patch_aggregation=use_patch_aggregation)
    if sizes.tiny_tokenizer:
        overrides["vocab_size"] = tokenizer_config(sizes).codebook_size
    if attn_implementation is not None:
        overrides["attn_implementation"] = attn_implementation
    return BeitV2Config.from_preset(sizes.mim_preset, **overrides)


def tokenizer_config(sizes: Sizes, teacher_dim: int = 512) -> VQKDConfig:
    """VQ-KD base-decoder3 (or the tiny one) with a random unit codebook (no k-means initialisation)."""
    if not sizes.tiny_tokenizer:
        return VQKDConfig.from_preset(
            "base-decoder3", image_size=sizes.image_size, kmeans_init=False, teacher_dim=teacher_dim
        )
    grid = sizes.image_size // sizes.patch_size
    return VQKDConfig(
        encoder_config=vqkd_encoder_config(
            "tiny", image_size=sizes.image_size, patch_size=sizes.patch_size, **TINY_VIT
        ),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=grid, code_dim=8, **TINY_VIT),
        codebook_size=64,
        code_dim=8,
        teacher_dim=teacher_dim,
        kmeans_init=False,
    )


def attention_implementations(requested: str | None) -> tuple[str, ...]:
    """The attention implementations of our model to time: `requested` (comma-separated), else "eager" and "sdpa",
    then every name that modeling_beitv2 registers with transformers' `AttentionInterface` or lists in a module-level
    constant (an UPPER_CASE tuple/list/set/dict of strings whose name mentions ATTN or ATTENTION).

    "eager" comes first: FLOPs are counted once per model, on its first variant, and eager attention gives the
    model's FLOPs (FlopCounterMode's SDPA backward formula adds the kernel's recomputation).
    """
    if requested:
        return tuple(dict.fromkeys(name.strip() for name in requested.split(",") if name.strip()))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = list(DEFAULT_ATTENTION_IMPLEMENTATIONS)
    package = modeling_beitv2.__name__
    names += [name for name, function in ALL_ATTENTION_FUNCTIONS.items()
              if getattr(function, "__module__", "").split(".")[0] == package]  # fmt: skip
    modules = [modeling_beitv2]
    for submodule in ("attention", "modeling_beitv2"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"{package}.{submodule}"))
    for module in modules:
        for constant, value in vars(module).items():
            if not constant.isupper() or not ("ATTN" in constant or "ATTENTION" in constant):
                continue
            if (
                isinstance(value, (tuple, list, set, frozenset, dict))
                and value
                and all(isinstance(v, str) for v in value)
            ):
                names += sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass
class MimBatch:
    pixel_values: torch.Tensor  # (batch, 3, image_size, image_size)
    bool_masked_pos: torch.Tensor  # (batch, num_patches), exactly `num_masked` True per row
    labels: torch.Tensor  # (batch, num_patches) visual tokens
    masked_labels: torch.Tensor  # (batch * num_masked,) in row-major order
    num_masked: int


def make_mim_batch(sizes: Sizes, vocab_size: int, device: torch.device) -> MimBatch:
    generator = torch.Generator().manual_seed(0)
    batch, size = sizes.batch_size, sizes.image_size
    num_patches = (size // sizes.patch_size) ** 2
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, : sizes.num_masked_patches], True)
    labels = torch.randint(0, vocab_size, (batch, num_patches), generator=generator)
    return MimBatch(
        pixel_values.to(device), mask.to(device), labels.to(device), labels[mask].to(device), sizes.num_masked_patches
    )


def make_tokenizer_pixels(sizes: Sizes, config: VQKDConfig, device: torch.device) -> torch.Tensor:
    """A batch as the image processor gives the tokenizer, `(batch, 3, image_size, image_size)` in [0, 1] (the
    tokenizer maps it itself); the same for our tokenizer and the official one."""
    size = config.encoder_config.image_size
    generator = torch.Generator().manual_seed(1)
    return torch.rand(sizes.batch_size, 3, size, size, generator=generator).to(device)


def measure_training_step(
    bench: Bench,
    section: str,
    fields: dict[str, Any],
    build: Callable[[], nn.Module],
    loss_of: Callable[[nn.Module], torch.Tensor],
    precision: str,
    compiled: bool,
    flops_cache: dict[Any, int],
    flops_key: Any,
) -> dict[str, Any] | None:
    """Time one training step (forward + backward + fused AdamW) of a freshly built model; record it. A failure is
    recorded as an error of `section` and returns None."""
    device, sizes = bench.device, bench.sizes
    description = ", ".join(f"{key} {value}" for key, value in fields.items()) + f", {precision}"
    if compiled:
        description += ", compiled"
    model = optimizer = runner = None
    try:
        free_memory(device)
        model = build().to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        graphs_before = None
        if compiled:
            torch._dynamo.reset()  # a fresh compilation, timed on its own
            graphs_before = dynamo_graph_count()
            runner = torch.compile(model, backend=sizes.compile_backend)
        else:
            runner = model
        losses: list[torch.Tensor] = []

        def step() -> None:
            with autocast(device, precision):
                loss = loss_of(runner)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        timing = time_steps(step, device, sizes.warmup_steps, sizes.timed_steps)
        memory = peak_gib(device)
        last_loss = float(losses[-1])
        if flops_key not in flops_cache:

            def forward_backward() -> None:
                with autocast(device, precision):
                    loss = loss_of(model)
                loss.backward()

            flops_cache[flops_key] = count_flops(forward_backward)
            optimizer.zero_grad(set_to_none=True)
        flops = flops_cache[flops_key]
        graphs_after = dynamo_graph_count() if compiled else None
        record = {
            "table": "mim",
            **fields,
            "compiled": compiled,
            "precision": precision,
            "batch_size": sizes.batch_size,
            "images_per_s": sizes.batch_size / timing.median_s,
            "ms_per_step": 1000 * timing.median_s,
            "gflop_per_image": flops / sizes.batch_size / 1e9,
            "mfu": bench.mfu(flops, timing.median_s),
            "peak_gib": memory,
            "compile_s": timing.compile_s if compiled else None,
            "first_step_s": timing.first_call_s,  # includes lazy kernel compilation (FlexAttention's, autotuning)
            "graphs": None if graphs_before is None or graphs_after is None else graphs_after - graphs_before,
            "loss": last_loss,
        }
        bench.results.add(section, record)
        return record
    except NotImplementedError as error:
        bench.results.add_unsupported(section, description, error)
        return None
    except Exception as error:
        bench.results.add_error(section, description, error)
        return None
    finally:
        model = optimizer = runner = None  # noqa: F841 -- drop the references before freeing the memory
        if compiled:
            torch._dynamo.reset()
        free_memory(device)


# ---------------------------------------------------------------------------------------------------------------
# Section: MIM training step


def mim_section(bench: Bench) -> None:
    from transformers import BeitConfig, BeitForMaskedImageModeling

    sizes, device = bench.sizes, bench.device
    implementations = attention_implementations(bench.args.attn_implementations)
    vocab_size = mim_config(sizes, True).vocab_size
    batch = make_mim_batch(sizes, vocab_size, device)
    flops: dict[Any, int] = {}

    def ours_model(aggregation: bool, implementation: str) -> nn.Module:
        return BeitV2ForMaskedImageModeling(mim_config(sizes, aggregation, implementation))

    def ours_loss(model: nn.Module) -> torch.Tensor:
        # The static masked count, as run_mim.py passes it (every image has the same number of masked patches).
        return model(
            batch.pixel_values, batch.bool_masked_pos, labels=batch.labels, num_masked_patches=batch.num_masked
        ).loss

    def stock_loss(model: nn.Module) -> torch.Tensor:
        return model(batch.pixel_values, bool_masked_pos=batch.bool_masked_pos, labels=batch.masked_labels).loss

    def stock_model(implementation: str) -> nn.Module:
        # The same backbone options (shared relative position bias, layer scale, ...); BEiT v1's head on every token.
        config = mim_config(sizes, False)
        stock_fields = set(BeitConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
        kwargs = {key: value for key, value in config.to_dict().items() if key in stock_fields}
        return BeitForMaskedImageModeling(BeitConfig(**kwargs, attn_implementation=implementation))

    eager_step_s: dict[str, float] = {}
    for precision in sizes.precisions:
        # The last precision is the one compared (bf16, as on the GPU); earlier ones (fp32 in --quick) only run the
        # training configuration, to check that they work.
        compared = precision == sizes.precisions[-1]
        for aggregation in (True, False) if compared else (True,):
            for implementation in implementations:
                record = measure_training_step(
                    bench,
                    "mim",
                    {"model": "ours", "attention": implementation, "aggregation": aggregation, "static_count": True},
                    partial(ours_model, aggregation, implementation),
                    ours_loss,
                    precision,
                    compiled=False,
                    flops_cache=flops,
                    flops_key=("ours", aggregation),
                )
                if record is not None and aggregation and compared:
                    eager_step_s[implementation] = record["ms_per_step"]
        for implementation in [name for name in ("eager", "sdpa") if name in implementations and compared]:
            measure_training_step(
                bench,
                "mim",
                {"model": "transformers BeitForMaskedImageModeling", "attention": implementation, "aggregation": False,
                 "static_count": False},
                partial(stock_model, implementation),
                stock_loss,
                precision,
                compiled=False,
                flops_cache=flops,
                flops_key="transformers",
            )  # fmt: skip

    if bench.args.compile == "off":
        return
    # Compiling takes minutes at ViT-B size: compile the fastest non-eager attention (or the ones asked for).
    if bench.args.compile_attention:
        to_compile = [name.strip() for name in bench.args.compile_attention.split(",") if name.strip()]
    else:
        candidates = {name: ms for name, ms in eager_step_s.items() if name != "eager"} or eager_step_s
        to_compile = [min(candidates, key=candidates.get)] if candidates else []
    for implementation in to_compile:
        measure_training_step(
            bench,
            "mim",
            {"model": "ours", "attention": implementation, "aggregation": True, "static_count": True},
            partial(ours_model, True, implementation),
            ours_loss,
            sizes.precisions[-1],
            compiled=True,
            flops_cache=flops,
            flops_key=("ours", True),
        )


# ---------------------------------------------------------------------------------------------------------------
# Section: tokenization


def measure_tokenization(
    bench: Bench,
    section: str,
    fields: dict[str, Any],
    tokenize: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    precision: str,
    flops_per_batch: int,
    reference: torch.Tensor | None = None,
    tf32: bool = False,
    compiled: bool = False,
) -> None:
    """Time `tokenize(inputs)` (no grad, under `precision` autocast, optionally compiled / with TF32 matmuls) and
    record images/s, MFU, peak memory and the fraction of codes equal to `reference`."""
    device, sizes = bench.device, bench.sizes
    try:
        free_memory(device)
        if compiled:
            torch._dynamo.reset()
            tokenize = torch.compile(tokenize, backend=sizes.compile_backend)
        codes: list[torch.Tensor] = []

        def step() -> None:
            with torch.no_grad(), autocast(device, precision):
                codes.append(tokenize(inputs))

        with tf32_matmuls(tf32):
            timing = time_steps(step, device, sizes.warmup_steps, sizes.timed_steps)
        agreement = None if reference is None else (codes[-1] == reference).float().mean().item()
        record = {
            "table": "tokenizer",
            **fields,
            "compiled": compiled,
            "batch_size": inputs.shape[0],
            "images_per_s": inputs.shape[0] / timing.median_s,
            "ms_per_batch": 1000 * timing.median_s,
            "agreement_with_fp32": agreement,
            "gflop_per_image": flops_per_batch / inputs.shape[0] / 1e9,
            "mfu": bench.mfu(flops_per_batch, timing.median_s),
            "peak_gib": peak_gib(device),
            "compile_s": timing.compile_s if compiled else None,
        }
        bench.results.add(section, record)
    except NotImplementedError as error:
        bench.results.add_unsupported(section, ", ".join(str(value) for value in fields.values()), error)
    except Exception as error:
        bench.results.add_error(section, ", ".join(str(value) for value in fields.values()), error)
    finally:
        if compiled:
            torch._dynamo.reset()


def tokenizer_section(bench: Bench) -> None:
    sizes, device = bench.sizes, bench.device
    config = tokenizer_config(sizes)
    torch.manual_seed(0)
    tokenizer = VQKDModel(config).to(device).eval()
    name = "ours, VQ-KD tiny" if sizes.tiny_tokenizer else "ours, VQ-KD base-decoder3"
    pixels = make_tokenizer_pixels(sizes, config, device)
    with tf32_matmuls(False), torch.no_grad():
        reference = tokenizer.get_codebook_indices(pixels)
        flops = count_flops(lambda: tokenizer.get_codebook_indices(pixels))
    variants = [
        ("fp32", "fp32", False, False),
        ("fp32 + TF32 matmuls", "fp32", True, False),
        ("bf16 autocast", "bf16", False, False),
        ("fp16 autocast", "fp16", False, False),
    ]
    if bench.args.compile != "off":
        variants.append(("bf16 autocast", "bf16", False, True))
    for label, precision, tf32, compiled in variants:
        measure_tokenization(
            bench,
            "tokenizer",
            {"model": name, "precision": label},
            tokenizer.get_codebook_indices,
            pixels,
            precision,
            flops,
            reference=reference,
            tf32=tf32,
            compiled=compiled,
        )
