"""The papers' published numbers a model card may show, and which model they describe.

A card shows a paper's numbers only for a model of the paper's setup: the same ViT widths and depth as one of the
`BEITV2_PRESETS` sizes (for VQ-KD, one of the `VQKD_PRESETS` tokenizers with the 8192 x 32 codebook) on 16 px
patches. The numbers are fixed here, never measured by this project; `model_cards.py` keeps them in a section of
their own, apart from what a run measured.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from modeling_beitv2 import BEITV2_PRESETS, VQKD_PRESETS
from modeling_beitv2.configuration_vqkd import vqkd_encoder_config

PAPER_BEITV2 = "BEiT v2 paper (Peng et al., 2022)"
PAPER_BEIT = "BEiT paper (Bao et al., 2021)"

# (family, size preset) -> rows of (what, setting, value, source). Fixed numbers from the papers, never measured
# here; all for ViT-*/16 models.
PAPER_RESULTS: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {
    ("beitv2", "base"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16, 300 epochs pretraining", "85.0", PAPER_BEITV2),
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16, 1600 epochs pretraining", "85.5", PAPER_BEITV2),
        ("ImageNet-1k linear probe top-1 (%)", "ViT-B/16, 300 epochs pretraining", "80.1", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-B/16 + UperNet, 300 epochs pretraining", "52.7", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-B/16 + UperNet, 1600 epochs pretraining", "53.1", PAPER_BEITV2),
    ],
    ("beitv2", "large"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 300 epochs pretraining", "86.6", PAPER_BEITV2),
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 1600 epochs pretraining", "87.3", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-L/16 + UperNet, 300 epochs pretraining", "55.0", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-L/16 + UperNet, 1600 epochs pretraining", "56.7", PAPER_BEITV2),
    ],
    ("beit", "base"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16", "83.2", PAPER_BEIT),
        ("ImageNet-1k linear probe top-1 (%)", "ViT-B/16", "56.7", PAPER_BEIT),
    ],
    ("beit", "large"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 800 epochs pretraining", "85.2", PAPER_BEIT),
    ],
}
# VQ-KD preset -> the paper's tokenizer ablation rows (Table 4), for an 8192 x 32 codebook on 16 px patches.
PAPER_VQKD_RESULTS: dict[str, list[tuple[str, str, str, str]]] = {
    "base-decoder3": [
        (
            "reconstruction loss",
            "ViT-B encoder, 3x768x12 decoder, 8192x32 codebook",
            "0.145",
            PAPER_BEITV2 + ", Table 4",
        ),
        ("codebook usage", "ViT-B encoder, 3x768x12 decoder, 8192x32 codebook", "95%", PAPER_BEITV2 + ", Table 4"),
    ],
    "base-decoder1": [
        ("reconstruction loss", "ViT-B encoder, 1x768x12 decoder", "0.164", PAPER_BEITV2 + ", Table 4"),
        ("codebook usage", "ViT-B encoder, 1x768x12 decoder", "100%", PAPER_BEITV2 + ", Table 4"),
    ],
}
PAPER_PATCH_SIZE = 16
PAPER_CODEBOOK = (8192, 32)
# Which paper rows describe a model of each kind (the MIM model is described by what it fine-tunes to).
_PAPER_ROWS_FOR_KIND = {
    "classifier": ("ImageNet-1k fine-tuning", "ImageNet-1k linear probe"),
    "segmentation": ("ADE20K",),
    "mim": ("ImageNet-1k", "ADE20K"),
}
_VIT_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def match_vit_preset(config: PretrainedConfig) -> str | None:
    """The name of the `BEITV2_PRESETS` size (`"tiny"` ... `"large"`) whose widths and depth `config` has, or None."""
    sizes = tuple(getattr(config, key, None) for key in _VIT_SIZE_KEYS)
    for name, preset in BEITV2_PRESETS.items():
        if sizes == tuple(preset[key] for key in _VIT_SIZE_KEYS):
            return name
    return None


def match_vqkd_preset(config: PretrainedConfig) -> str | None:
    """The name of the `VQKD_PRESETS` tokenizer (e.g. `"base-decoder3"`) whose encoder widths and depth and
    decoder depth a `VQKDConfig` has, or None."""
    encoder = config.encoder_config
    sizes = tuple(getattr(encoder, key) for key in _VIT_SIZE_KEYS)
    for name, preset in VQKD_PRESETS.items():
        preset_encoder = vqkd_encoder_config(preset["size"])
        if sizes == tuple(preset_encoder[key] for key in _VIT_SIZE_KEYS) and (
            config.decoder_config.num_hidden_layers == preset["decoder_layers"]
        ):
            return name
    return None


def _vit_config(config: PretrainedConfig) -> PretrainedConfig:
    """The ViT inside a model: the VQ-KD encoder, the UperNet backbone, else the config itself."""
    return getattr(config, "encoder_config", None) or getattr(config, "backbone_config", None) or config


def paper_results_rows(kind: str, config: PretrainedConfig, family: str | None) -> list[tuple[str, str, str, str]]:
    """The paper's numbers that describe a model of this kind and config: rows of the paper's preset that the
    config matches (same widths, depth and 16 px patches; for VQ-KD also the 8192 x 32 codebook), else none."""
    if kind == "vqkd":
        same_setup = (config.codebook_size, config.code_dim) == PAPER_CODEBOOK and (
            config.encoder_config.patch_size == PAPER_PATCH_SIZE
        )
        return list(PAPER_VQKD_RESULTS.get(match_vqkd_preset(config), [])) if same_setup else []
    prefixes = _PAPER_ROWS_FOR_KIND.get(kind)
    vit = _vit_config(config)
    if not prefixes or family is None or vit.patch_size != PAPER_PATCH_SIZE:
        return []
    rows = PAPER_RESULTS.get((family, match_vit_preset(vit) or ""), [])
    return [row for row in rows if row[0].startswith(prefixes)]
