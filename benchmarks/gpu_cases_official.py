"""bench_gpu.py's ``official`` section: the official BEiT v2 code (microsoft/unilm's ``beit2/``) under the same
measurement as ours.

The checkout is imported from where it is (never copied here); its training-only modules are replaced by empty
stand-ins while it is imported, since the frozen tokenizer needs none of their packages.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gpu_cases_model import (
    make_mim_batch,
    make_tokenizer_pixels,
    measure_tokenization,
    measure_training_step,
    mim_config,
    tokenizer_config,
)
from gpu_common import Bench, SectionSkipped
from gpu_timing import count_flops, free_memory
from torch import nn

from modeling_beitv2 import BeitV2Config, VQKDConfig

# The official tokenizer module imports its training utilities (`utils`: tensorboardX, torch._six, gone since
# torch 2.0) and its teacher loaders (`vqkd_teacher`: torchvision, ftfy, downloads). A frozen tokenizer uses neither,
# so empty stand-ins take their place while it is imported.
OFFICIAL_TRAINING_ONLY_MODULES = ("utils", "vqkd_teacher")


def import_official(directory: str | Path) -> tuple[types.ModuleType, types.ModuleType]:
    """`modeling_pretrain` and `modeling_vqkd` of a microsoft/unilm `beit2/` checkout, imported from there.

    Raises:
        SectionSkipped: the folder is not such a checkout, or its imports fail (timm and einops are needed).
    """
    directory = Path(directory).resolve()
    missing = [name for name in ("modeling_pretrain.py", "modeling_vqkd.py") if not (directory / name).is_file()]
    if missing:
        raise SectionSkipped(
            f"--official_beit2_dir {directory} is not a checkout of microsoft/unilm's beit2/ folder (no {missing[0]})."
        )
    saved = {name: sys.modules.get(name) for name in OFFICIAL_TRAINING_ONLY_MODULES}
    sys.path.insert(0, str(directory))
    try:
        for name in OFFICIAL_TRAINING_ONLY_MODULES:
            sys.modules[name] = _official_stand_in(name)
        return importlib.import_module("modeling_pretrain"), importlib.import_module("modeling_vqkd")
    except ImportError as error:
        raise SectionSkipped(
            f"the official code in {directory} could not be imported ({type(error).__name__}: {error}); it needs timm "
            "and einops (carry an einops wheel to the GPU machine)."
        ) from error
    finally:
        # Its folder holds `utils.py`, `datasets.py`, `transforms.py`: keep them from shadowing anything later.
        sys.path.remove(str(directory))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _official_stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Empty stand-in for the official `{name}` (training only; see bench_gpu.py).")

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"bench_gpu.py replaces the official `{name}` module: teachers are not available.")

    module.clip = types.SimpleNamespace(load=unavailable)
    module.get_dino_vit_base = unavailable
    return module


def official_mim_model(module: types.ModuleType, config: BeitV2Config) -> nn.Module:
    """The official `VisionTransformerForMaskedImageModelingCLS` with `config`'s sizes (BEiT v2 recipe: shared
    relative position bias, no absolute position embedding, layer scale)."""
    return module.VisionTransformerForMaskedImageModelingCLS(
        img_size=config.image_size,
        patch_size=config.patch_size,
        vocab_size=config.vocab_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        init_values=config.layer_scale_init_value,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        drop_path_rate=0.0,
        early_layers=config.early_layers,
        head_layers=config.head_layers,
        shared_lm_head=config.shared_lm_head,
    )


def official_tokenizer(module: types.ModuleType, config: VQKDConfig) -> nn.Module:
    """The official VQKD with `config`'s sizes, as a frozen tokenizer (no teacher), random unit codebook."""
    encoder, decoder = config.encoder_config, config.decoder_config
    encoder_kwargs, decoder_kwargs = module.get_model_default_params(), module.get_model_default_params()
    encoder_kwargs.update(
        img_size=encoder.image_size, patch_size=encoder.patch_size, embed_dim=encoder.hidden_size,
        depth=encoder.num_hidden_layers, num_heads=encoder.num_attention_heads,
        mlp_ratio=encoder.intermediate_size / encoder.hidden_size, num_classes=0,
    )  # fmt: skip
    decoder_kwargs.update(
        img_size=decoder.image_size, patch_size=1, in_chans=config.code_dim, embed_dim=decoder.hidden_size,
        depth=decoder.num_hidden_layers, num_heads=decoder.num_attention_heads,
        mlp_ratio=decoder.intermediate_size / decoder.hidden_size, num_classes=0,
    )  # fmt: skip
    return module.VQKD(
        encoder_kwargs,
        decoder_kwargs,
        n_embed=config.codebook_size,
        embed_dim=config.code_dim,
        quantize_kmeans_init=False,
        teacher_model_type="None",
        decoder_out_dim=config.teacher_dim,
    )


def official_section(bench: Bench) -> None:
    if not bench.args.official_beit2_dir:
        raise SectionSkipped("no --official_beit2_dir given (a checkout of microsoft/unilm's beit2/ folder).")
    pretrain, vqkd = import_official(bench.args.official_beit2_dir)
    sizes, device = bench.sizes, bench.device
    config = mim_config(sizes, True)
    batch = make_mim_batch(sizes, config.vocab_size, device)
    flops: dict[Any, int] = {}

    def official_loss(model: nn.Module) -> torch.Tensor:
        # As its engine: both heads' logits at the masked positions, one cross-entropy each.
        outputs = model(batch.pixel_values, bool_masked_pos=batch.bool_masked_pos)
        return sum(nn.functional.cross_entropy(logits.float(), batch.masked_labels) for logits in outputs)

    for precision in sizes.precisions:
        measure_training_step(
            bench,
            "official",
            {"model": "official VisionTransformerForMaskedImageModelingCLS", "attention": "eager (its own)",
             "aggregation": True, "static_count": False},
            partial(official_mim_model, pretrain, config),
            official_loss,
            precision,
            compiled=False,
            flops_cache=flops,
            flops_key="official",
        )  # fmt: skip

    # The official engine tokenizes the [0, 1] tokenizer view under fp16 autocast.
    config = tokenizer_config(sizes)
    images = make_tokenizer_pixels(sizes, config, device)
    try:
        free_memory(device)
        torch.manual_seed(0)
        tokenizer = official_tokenizer(vqkd, config).to(device).eval()
        with torch.no_grad():
            flops_per_batch = count_flops(lambda: tokenizer.get_codebook_indices(images))
    except Exception as error:
        bench.results.add_error("official", "official VQKD", error)
        return
    measure_tokenization(
        bench,
        "official",
        {"model": "official VQKD", "precision": "fp16 autocast (as its engine)"},
        tokenizer.get_codebook_indices,
        images,
        "fp16",
        flops_per_batch,
    )
