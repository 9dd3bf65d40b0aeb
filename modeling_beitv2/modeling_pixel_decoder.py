"""A pixel decoder for VQ-KD codes: it paints the image that a grid of BEiT v2 visual tokens stands for.

VQ-KD codes are trained to reconstruct a teacher's features, never pixels, so a tokenizer alone cannot show what
its codes look like (the paper's authors mention a decoder "for visualisation only" that was never released). This
decoder is trained afterwards on a frozen tokenizer (`examples/run_pixel_decoder.py`) and reads nothing but the
codes: the tokenizer's l2-normalised codebook is copied into it, so `decode(indices)` needs no tokenizer.

State-dict layout: `embeddings.codebook` (frozen buffer, `(codebook_size, code_dim)`), `embeddings.projection`,
`embeddings.position_embeddings`, `layers.{i}.{layernorm_before, attention.qkv, attention.o_proj, layernorm_after,
mlp.fc1, mlp.fc2}`, `layernorm`, `head`, `refiner.{conv_in, conv_mid, conv_out}`.
"""

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.beit.modeling_beit import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .configuration_pixel_decoder import VQKDPixelDecoderConfig

# Marks the refiner's last convolution, initialised to zero so that the refiner starts as the identity.
_STARTS_AT_ZERO = "_starts_at_zero"


@dataclass
class VQKDPixelDecoderOutput(ModelOutput):
    """
    Output of [`VQKDPixelDecoder.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            The pixel loss (`config.loss_type`) of the unclamped prediction against `pixel_values`; only when they
            are given.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            The painted images, clamped to [0, 1] (what [`VQKDPixelDecoder.decode`] returns).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The token embeddings, then each block's output, each `(batch_size, num_patches, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Each block's attention weights `(batch_size, num_heads, num_patches, num_patches)` (eager attention).
    """

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def random_unit_codes(like: torch.Tensor) -> torch.Tensor:
    """Random l2-normalised rows of `like`'s shape: the codebook of a decoder built without a tokenizer."""
    return F.normalize(torch.randn_like(like), dim=-1)


class VQKDPixelDecoderEmbeddings(nn.Module):
    """Codes -> tokens: look the codes up in the frozen codebook, project them to the decoder's width, add learned
    position embeddings. `(batch, num_patches)` int64 -> `(batch, num_patches, hidden_size)`."""

    codebook: torch.Tensor  # a buffer (registered in `__init__`)

    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__()
        # A buffer, not a parameter: the optimizer never sees it and it is saved with the decoder. Drawn here as in
        # `_init_weights`, so that a decoder built without the init pass holds unit codes, not uninitialised memory.
        self.register_buffer("codebook", random_unit_codes(torch.empty(config.codebook_size, config.code_dim)))
        self.projection = nn.Linear(config.code_dim, config.hidden_size)
        self.position_embeddings = nn.Parameter(torch.empty(1, config.num_patches, config.hidden_size))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.codebook[indices].to(self.projection.weight.dtype)
        return self.projection(codes) + self.position_embeddings


class VQKDPixelDecoderAttention(nn.Module):
    """Multi-head self-attention over the code grid, through transformers' attention interface: `"sdpa"` (PyTorch's
    fused `scaled_dot_product_attention`, the default) or `"eager"` (which also returns the attention weights)."""

    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch, length, hidden_size)` -> the attended tokens (same shape) and the attention weights
        `(batch, heads, length, length)` (eager attention) or `None`."""
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, length, head_dim)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # `scaling=None`: the default `head_dim ** -0.5` of both implementations.
        attended, weights = attention_interface(self, query, key, value, None, scaling=None, dropout=0.0, **kwargs)
        return self.o_proj(attended.reshape(batch_size, length, width)), weights


class VQKDPixelDecoderMLP(nn.Module):
    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class VQKDPixelDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm Transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VQKDPixelDecoderAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VQKDPixelDecoderMLP(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states), **kwargs)[0]
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class VQKDPixelRefiner(nn.Module):
    """Residual 3x3 convolutions at full resolution, `x + convs(x)`: each patch is painted from its own token, so
    neighbouring patches may disagree at their shared border; a few pixels of context across it remove the seam.
    The last convolution starts at zero, so the refiner starts as the identity."""

    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__()
        channels, width = config.num_channels, config.refine_channels
        self.conv_in = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, kernel_size=3, padding=1)
        setattr(self.conv_out, _STARTS_AT_ZERO, True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.conv_mid(F.gelu(self.conv_in(pixels))))
        return pixels + self.conv_out(hidden)


class VQKDPixelPatchHead(nn.Linear):
    """Token `(..., hidden_size)` -> its patch of pixels `(..., patch_size * patch_size * num_channels)`."""


class VQKDPixelDecoderPreTrainedModel(PreTrainedModel):
    config: VQKDPixelDecoderConfig
    config_class = VQKDPixelDecoderConfig
    base_model_prefix = "pixel_decoder"
    main_input_name = "input_ids"
    input_modalities = ("image",)  # type: ignore[assignment]  # transformers annotates str | list[str]; its own models use tuples
    _no_split_modules = ["VQKDPixelDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _can_record_outputs = {"hidden_states": VQKDPixelDecoderLayer, "attentions": VQKDPixelDecoderAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, VQKDPixelPatchHead):
            # The head starts by painting mid-grey: the centre of the [0, 1] targets.
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            init.constant_(module.bias, 0.5)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VQKDPixelDecoderEmbeddings):
            # Random unit codes keep a decoder built without a tokenizer usable; `from_tokenizer` overwrites them.
            init.copy_(module.codebook, random_unit_codes(module.codebook))
            init.trunc_normal_(module.position_embeddings, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, nn.Conv2d):
            # Handled per convolution: transformers skips `_init_weights` on custom-code modules that own no
            # parameter themselves, such as the refiner.
            if getattr(module, _STARTS_AT_ZERO, False):
                init.zeros_(module.weight)
            else:
                init.kaiming_normal_(module.weight, nonlinearity="relu")
            init.zeros_(cast(torch.Tensor, module.bias))  # the refiner's convolutions have biases


class VQKDPixelDecoder(VQKDPixelDecoderPreTrainedModel):
    r"""
    Paints [0, 1] pixels from a grid of VQ-KD codes, at the tokenizer's resolution.

    Architecture: each code is looked up in the tokenizer's frozen, l2-normalised codebook (copied in by
    [`from_tokenizer`]), projected to `hidden_size` and given a learned position embedding; `num_hidden_layers`
    pre-norm Transformer blocks mix the grid; a LayerNorm and a Linear turn every token into its `patch_size` x
    `patch_size` x `num_channels` patch of pixels; the patches are laid out as an image and a small residual
    convolutional refiner (`refine_channels`, zero-initialised) smooths the borders between them.

    Why this design: VQ-KD codes are semantic, so one code covers many different pixel patches and the colour
    and layout of a patch are only partly in its own code. Attention over the whole grid lets every patch use its
    neighbours' codes (a patch of "sky" next to "sea" is painted differently from one next to "roof"), which a
    per-code lookup cannot; the tokens stay at patch resolution, where attention is cheap (196 tokens at 224 px),
    and only the refiner works at full resolution. The codebook vectors are the input rather than a table learned
    per code index, so codes that the tokenizer put close together start out painted alike and rare codes borrow
    from their neighbours.

    Loss: mean squared error on [0, 1] pixels by default (`loss_type="mse"`), since PSNR, the measure reported, is
    a function of it; its optimum is the mean of the pixels that a grid of codes stands for, which is also what the
    mean-patch baseline of `examples/run_pixel_decoder.py` computes per code, without the context. `loss_type="l1"`
    gives the median instead (sharper edges, lower PSNR). The loss is taken on the unclamped prediction, so its
    gradient never vanishes; `decode` and `forward`'s `reconstruction` clamp to [0, 1], which can only bring a
    prediction closer to a [0, 1] image. A perceptual loss through the teacher was left out: it needs the teacher
    at training time, and the pixel losses already beat the baseline.

    Example:

    ```python
    >>> import torch
    >>> from modeling_beitv2 import VQKDConfig, VQKDModel, VQKDPixelDecoder
    >>> tokenizer = VQKDModel(VQKDConfig.from_preset("tiny-decoder1", image_size=32, codebook_size=64, kmeans_init=False))
    >>> decoder = VQKDPixelDecoder.from_tokenizer(tokenizer, hidden_size=64, num_attention_heads=4)
    >>> codes = tokenizer.eval().get_codebook_indices(torch.rand(2, 3, 32, 32))
    >>> decoder.decode(codes).shape
    torch.Size([2, 3, 32, 32])

    ```
    """

    def __init__(self, config: VQKDPixelDecoderConfig) -> None:
        super().__init__(config)
        self.embeddings = VQKDPixelDecoderEmbeddings(config)
        self.layers = nn.ModuleList(VQKDPixelDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = VQKDPixelPatchHead(config.hidden_size, config.patch_size**2 * config.num_channels)
        self.refiner = VQKDPixelRefiner(config) if config.refine_channels else None
        self.post_init()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **config_overrides: Any) -> "VQKDPixelDecoder":
        """
        A new decoder for `tokenizer` (a `VQKDModel`): its codebook size, code dimension, image and patch size, and
        a copy of its l2-normalised codebook (a frozen buffer saved with the decoder, so that neither the tokenizer
        nor its teacher is needed to decode).

        Args:
            tokenizer (`VQKDModel`): the frozen tokenizer whose codes the decoder will read.
            config_overrides: settings of [`VQKDPixelDecoderConfig`] for the decoder itself (`hidden_size`,
                `num_hidden_layers`, ...). The tokenizer's own settings may appear only with the tokenizer's values.

        Raises:
            ValueError: an override contradicts the tokenizer, or its codebook still waits for its k-means init.
        """
        quantizer = tokenizer.quantizer
        if not bool(quantizer.initted):
            raise ValueError(
                "The tokenizer's codebook is still waiting for its k-means initialisation: train the tokenizer (or "
                "load a trained one) before building a pixel decoder for it."
            )
        settings = {
            "codebook_size": tokenizer.codebook_size,
            "code_dim": tokenizer.config.code_dim,
            "image_size": tokenizer.image_size,
            "patch_size": tokenizer.config.encoder_vit.patch_size,
        }
        clashes = [f"{k}={v!r} (tokenizer: {settings[k]!r})" for k, v in config_overrides.items()
                   if k in settings and v != settings[k]]  # fmt: skip
        if clashes:
            raise ValueError(
                f"The decoder must match its tokenizer; these settings differ from it: {', '.join(clashes)}. "
                f"Leave {', '.join(settings)} out: they are read from the tokenizer."
            )
        decoder = cls(VQKDPixelDecoderConfig(**{**config_overrides, **settings}))
        with torch.no_grad():
            decoder.embeddings.codebook.copy_(F.normalize(quantizer.codebook.float(), dim=-1))
        return decoder

    @property
    def codebook_size(self) -> int:
        """Number of codes the decoder reads."""
        return self.config.codebook_size

    def get_input_embeddings(self) -> nn.Module:
        """The code embedding: codebook lookup, projection and position embeddings (codes, not text tokens)."""
        return self.embeddings

    @property
    def image_size(self) -> int:
        """Side of the square images the decoder paints (the tokenizer's input size)."""
        return self.config.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the code grid of one image."""
        return self.config.patch_grid

    def _flat_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Check codes of shape `(batch, rows, cols)` or `(batch, rows * cols)` and flatten them to the latter."""
        rows, cols = self.patch_grid
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor of code ids, got dtype {indices.dtype}.")
        if not (indices.ndim == 3 and tuple(indices.shape[1:]) == (rows, cols)) and not (
            indices.ndim == 2 and indices.shape[1] == rows * cols
        ):
            raise ValueError(
                f"indices of shape {tuple(indices.shape)} do not match the tokenizer's {rows}x{cols} grid of codes: "
                f"expected (batch, {rows}, {cols}) or (batch, {rows * cols})."
            )
        if indices.numel() == 0:
            return indices.reshape(0, rows * cols).long()  # an empty batch: no id to check
        # One host sync: an out-of-range id would otherwise index the codebook out of bounds (a device-side assert
        # on GPUs, which poisons the CUDA context) instead of raising.
        low, high = torch.stack(torch.aminmax(indices)).tolist()
        if low < 0 or high >= self.codebook_size:
            raise ValueError(
                f"Code ids must lie in [0, {self.codebook_size}) (codebook_size {self.codebook_size}); got ids from "
                f"{low} to {high}."
            )
        return indices.reshape(indices.shape[0], rows * cols).long()

    def _paint(self, indices: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Checked codes `(batch, num_patches)` -> unclamped pixels `(batch, num_channels, image_size, image_size)`."""
        (rows, cols), patch, channels = self.patch_grid, self.config.patch_size, self.config.num_channels
        if indices.shape[0] == 0:
            # An empty batch paints an empty batch (transformers' attention functions cannot reshape zero images).
            return self.head.weight.new_zeros(0, channels, rows * patch, cols * patch)
        hidden_states = self.embeddings(indices)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        patches = self.head(self.layernorm(hidden_states))  # (batch, rows * cols, patch * patch * channels)
        pixels = patches.view(-1, rows, cols, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
        pixels = pixels.reshape(-1, channels, rows * patch, cols * patch)
        return pixels if self.refiner is None else self.refiner(pixels)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """
        Paint the images of a batch of code grids.

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, rows, cols)` or `(batch_size, rows * cols)`):
                code ids in `[0, codebook_size)`, e.g. from `VQKDModel.get_codebook_indices`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)` in [0, 1] (empty for an
            empty batch).

        Raises:
            ValueError: a grid that is not the tokenizer's `patch_grid`, or ids outside `[0, codebook_size)`.
        """
        return self._paint(self._flat_indices(indices)).clamp(0, 1)

    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VQKDPixelDecoderOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, rows, cols)` or `(batch_size, rows * cols)`):
                Code ids of the images, as in [`decode`].
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`,
                *optional*): The [0, 1] images the codes were computed from (the tokenizer's view); with them the
                pixel loss is computed.
            output_hidden_states (`bool` or `list[int]`, *optional*, defaults to `config.output_hidden_states`):
                Return the token embeddings and each block's output (all of them, or those at the given indices).
            output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
                Return each block's attention weights (eager attention).
            return_dict (`bool`, *optional*, defaults to `config.return_dict`):
                Return a [`VQKDPixelDecoderOutput`] rather than a tuple.
        """
        # Recorded by transformers' output capturing, not passed down.
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("output_attentions", None)
        indices = self._flat_indices(input_ids)
        prediction = self._paint(indices, **kwargs)
        loss = None
        if pixel_values is not None:
            if pixel_values.shape != prediction.shape:
                raise ValueError(
                    f"pixel_values has shape {tuple(pixel_values.shape)} but the decoder paints "
                    f"{tuple(prediction.shape)} (batch, num_channels, image_size, image_size)."
                )
            loss_function = F.mse_loss if self.config.loss_type == "mse" else F.l1_loss
            loss = loss_function(prediction.float(), pixel_values.float())
        return VQKDPixelDecoderOutput(loss=loss, reconstruction=prediction.clamp(0, 1))


__all__ = ["VQKDPixelDecoder", "VQKDPixelDecoderOutput", "VQKDPixelDecoderPreTrainedModel"]
