"""Configuration of the VQ-KD visual tokenizer of BEiT v2."""

from __future__ import annotations

from typing import Any, cast

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig, PreTrainedConfig

# Options shared by the encoder and decoder ViTs of the reference tokenizer: absolute position embeddings, no
# relative bias, no layer scale, LayerNorm eps 1e-6, a final LayerNorm on every token, no pooling.
VQKD_VIT_DEFAULTS: dict[str, Any] = dict(
    use_absolute_position_embeddings=True,
    use_relative_position_bias=False,
    use_shared_relative_position_bias=False,
    use_mask_token=False,
    layer_scale_init_value=0.0,
    layer_norm_eps=1e-6,
    use_mean_pooling=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)
# The named ViT sizes of the tokenizer's encoder (the decoder takes the encoder's width).
VQKD_VIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}

_DEFAULT_PATCH_SIZE = 16

# One table for the named tokenizers: (encoder size, decoder depth). The decoder has the encoder's width.
VQKD_PRESETS: dict[str, dict[str, Any]] = {
    "base-decoder3": dict(size="base", decoder_layers=3),  # the paper's default tokenizer
    "base-decoder1": dict(size="base", decoder_layers=1),  # the 1-layer-decoder ablation / released variant
    "tiny-decoder1": dict(size="tiny", decoder_layers=1),
}


def vqkd_encoder_config(
    size: str = "base", image_size: int = 224, patch_size: int = _DEFAULT_PATCH_SIZE, **overrides: Any
) -> dict:
    """Keyword arguments of the encoder `BeitConfig` for a named ViT size."""
    return {
        **VQKD_VIT_DEFAULTS,
        **VQKD_VIT_SIZES[size],
        "image_size": image_size,
        "patch_size": patch_size,
        **overrides,
    }


def vqkd_decoder_config(
    size: str = "base", num_layers: int = 3, grid_size: int = 14, code_dim: int = 32, **overrides: Any
) -> dict:
    """Keyword arguments of the decoder `BeitConfig`: a ViT with patch size 1 over the `grid_size` grid of codes."""
    return {
        **VQKD_VIT_DEFAULTS,
        **VQKD_VIT_SIZES[size],
        "num_hidden_layers": num_layers,
        "image_size": grid_size,
        "patch_size": 1,
        "num_channels": code_dim,
        **overrides,
    }


@strict
class VQKDEncoderConfig(BeitConfig):
    r"""
    The encoder ViT of [`VQKDConfig`] (`encoder_config`): a `BeitConfig` with a `model_type` of its own. A VQ-KD
    folder then holds no `beit` config, so `BeitConfig.from_pretrained(<VQ-KD folder>)` warns of the mismatched
    model type as transformers does for any other model, instead of silently returning one of the two ViTs; and
    `VQKDEncoderConfig.from_pretrained(<VQ-KD folder>)` reads the encoder (`base_config_key`).
    """

    model_type = "beitv2_vqkd_encoder"
    base_config_key = "encoder_config"


@strict
class VQKDDecoderConfig(BeitConfig):
    r"""The decoder ViT of [`VQKDConfig`] (`decoder_config`); see [`VQKDEncoderConfig`]."""

    model_type = "beitv2_vqkd_decoder"
    base_config_key = "decoder_config"


@strict
class VQKDConfig(PreTrainedConfig):
    r"""
    Configuration of [`VQKDModel`], the vector-quantized knowledge-distillation tokenizer of BEiT v2.

    The encoder is a ViT over the image (`encoder_config`); its patch tokens go through the encode task layer
    (Linear-Tanh-Linear down to `code_dim`) and the quantizer; the decoder is a ViT with patch size 1 over the
    grid of codes (`decoder_config`, `num_channels == code_dim`), followed by the decode task layer
    (Linear-Tanh-Linear up to `teacher_dim`) that regresses the teacher's patch features.

    Args:
        encoder_config (`dict` or `BeitConfig`, *optional*):
            The encoder ViT ([`VQKDEncoderConfig`]). Defaults to ViT-B/16 at 224 px with absolute position
            embeddings, no layer scale, LayerNorm eps 1e-6 and a final LayerNorm on every token
            ([`vqkd_encoder_config`]); the keys of a dict override these defaults, a `BeitConfig` is taken as is.
        decoder_config (`dict` or `BeitConfig`, *optional*):
            The decoder ViT. Defaults to 3 base-width layers with patch size 1 over the encoder's grid of codes
            (`num_channels == code_dim`) and the encoder's defaults otherwise ([`vqkd_decoder_config`]); the keys
            of a dict override these defaults.
        codebook_size (`int`, defaults to 8192): number of codes (visual tokens).
        code_dim (`int`, defaults to 32): dimension of the codes.
        decay (`float`, defaults to 0.99): EMA decay of the codebook.
        beta (`float`, defaults to 1.0): weight of the commitment loss.
        kmeans_init (`bool`, defaults to `True`): k-means codebook init on the first batch (the released recipe).
        dead_code_threshold (`float`, defaults to 0.0): EMA usage below which codes are re-seeded (0 = never, as
            in the reference).
        teacher_dim (`int`, defaults to 512): feature size of the teacher (512 for CLIP ViT-B/16, 768 for DINO).

    Example:

    ```python
    >>> from modeling_beitv2 import VQKDConfig
    >>> config = VQKDConfig.from_preset("base-decoder1")
    >>> config.decoder_config.num_hidden_layers, config.num_patches
    (1, 196)
    ```"""

    model_type = "beitv2_vqkd"
    # transformers resolves bare config classes to `SubConfigSpec`s when the class is defined (`__init_subclass__`).
    sub_configs_defaults = {"encoder_config": VQKDEncoderConfig, "decoder_config": VQKDDecoderConfig}  # type: ignore[dict-item]

    encoder_config: dict | BeitConfig | None = None
    decoder_config: dict | BeitConfig | None = None
    codebook_size: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = True
    dead_code_threshold: float = 0.0
    teacher_dim: int = 512
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        # Missing or partial sub-configs are completed with the tokenizer's defaults here: `BeitConfig` would fill
        # in its own (no position embeddings, no final LayerNorm, layer scale, eps 1e-12), silently another model.
        # A saved config lists every key, so reloading one is unaffected. Checks are here rather than in
        # `validate_*` hooks so that users get a plain `ValueError`.
        if self.encoder_config is None or isinstance(self.encoder_config, dict):
            self.encoder_config = {**vqkd_encoder_config(), **(self.encoder_config or {})}
        if self.decoder_config is None or isinstance(self.decoder_config, dict):
            encoder = self.encoder_config
            grid = _get(encoder, "image_size") // _get(encoder, "patch_size")
            defaults = vqkd_decoder_config(grid_size=grid, code_dim=self.code_dim)
            self.decoder_config = {**defaults, **(self.decoder_config or {})}
        # A plain `BeitConfig` becomes the sub-config class, so that the saved folder names no `beit` config.
        # (Not `config_class.from_dict(...)`: its `to_dict()` is the same, but the object keeps `model_type: "beit"`.)
        for key, config_class in self.sub_configs.items():
            value = getattr(self, key)
            if isinstance(value, BeitConfig) and not isinstance(value, config_class):
                setattr(self, key, config_class(**_without_model_type(value.to_dict())))
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}.")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}.")
        super().__post_init__(**kwargs)
        # `super().__post_init__` made both sub-configs config objects (`sub_configs_defaults`); the tokenizer's
        # ViTs have square int sizes.
        encoder, decoder = self.encoder_vit, self.decoder_vit
        image_size, patch_size = cast(int, encoder.image_size), cast(int, encoder.patch_size)
        if decoder.num_channels != self.code_dim:
            raise ValueError(
                f"decoder_config.num_channels ({decoder.num_channels}) must equal code_dim ({self.code_dim}): "
                "the decoder reads the grid of codes."
            )
        if decoder.patch_size != 1 or decoder.image_size != image_size // patch_size:
            raise ValueError(
                f"The decoder must use patch_size 1 over the encoder's patch grid "
                f"({image_size // patch_size}), got patch_size {decoder.patch_size} and "
                f"image_size {decoder.image_size}."
            )
        if image_size % patch_size:
            raise ValueError(f"encoder image_size {image_size} is not divisible by patch_size {patch_size}.")

    # Typed views of the two sub-configs: after `__post_init__` both are `BeitConfig`s (the field annotations also
    # admit the dicts and `None` that the constructor takes).
    @property
    def encoder_vit(self) -> BeitConfig:
        """The encoder ViT's config (`encoder_config`)."""
        return cast(BeitConfig, self.encoder_config)

    @property
    def decoder_vit(self) -> BeitConfig:
        """The decoder ViT's config (`decoder_config`)."""
        return cast(BeitConfig, self.decoder_config)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the code grid."""
        side = cast(int, self.encoder_vit.image_size) // cast(int, self.encoder_vit.patch_size)
        return side, side

    @property
    def num_patches(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols

    @classmethod
    def from_preset(
        cls, name: str, image_size: int = 224, patch_size: int | None = None, **overrides: Any
    ) -> VQKDConfig:
        """Build a config from a named tokenizer (`base-decoder3`, `base-decoder1`, `tiny-decoder1`).

        Args:
            name: a key of `VQKD_PRESETS`.
            image_size: side of the encoder's input images.
            patch_size: the encoder's patch size (a tokenizer trained against a teacher takes the teacher's); the
                decoder then covers the `image_size // patch_size` grid of codes. Defaults to 16, the paper's.
            overrides: other `VQKDConfig` arguments (`codebook_size`, `code_dim`, `teacher_dim`, ...).
        """
        if name not in VQKD_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(VQKD_PRESETS)}.")
        patch_size = _DEFAULT_PATCH_SIZE if patch_size is None else patch_size
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}.")
        preset = VQKD_PRESETS[name]
        code_dim = overrides.get("code_dim", cls.code_dim)
        encoder = vqkd_encoder_config(preset["size"], image_size=image_size, patch_size=patch_size)
        decoder = vqkd_decoder_config(
            preset["size"], num_layers=preset["decoder_layers"], grid_size=image_size // patch_size, code_dim=code_dim
        )
        return cls(**{"encoder_config": encoder, "decoder_config": decoder, **overrides})


def _without_model_type(config_dict: dict) -> dict:
    return {key: value for key, value in config_dict.items() if key not in ("model_type", "transformers_version")}


def _get(config: dict | BeitConfig, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)
