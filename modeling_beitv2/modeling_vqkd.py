"""The VQ-KD visual tokenizer of BEiT v2: ViT encoder -> l2-normalised EMA quantizer -> ViT decoder -> teacher features.

Input convention: `pixel_values` are plain RGB images in [0, 1]. The model maps them to its encoder's [-1, 1] itself
(`x * 2 - 1`, the reference tokenizer's "default" `pre_process`), so image processors, scripts and teachers never
need to know the tokenizer's internal range.

State-dict layout and the official checkpoint's names (for converters):

| ours | official (unilm `VQKD`) |
|---|---|
| `encoder.embeddings.{cls_token, position_embeddings}` | `encoder.{cls_token, pos_embed}` |
| `encoder.embeddings.patch_embeddings.projection.*` | `encoder.patch_embed.proj.*` |
| `encoder.layers.{i}.layernorm_before / layernorm_after` | `encoder.blocks.{i}.norm1 / norm2` |
| `encoder.layers.{i}.attention.{q,k,v}_proj` | `encoder.blocks.{i}.attn.qkv.weight` split in 3, `q_bias`, `v_bias` |
| `encoder.layers.{i}.attention.o_proj` | `encoder.blocks.{i}.attn.proj` |
| `encoder.layers.{i}.mlp.fc1 / fc2` | `encoder.blocks.{i}.mlp.fc1 / fc2` |
| `encoder.layernorm` | `encoder.fc_norm` |
| `decoder.*` | `decoder.*` (same renaming) |
| `encode_task_layer.{0,2}`, `decode_task_layer.{0,2}` | same |
| `quantizer.codebook` | `quantize.embedding.weight` |
| `quantizer.cluster_size` | `quantize.cluster_size` |
| `quantizer.initted` | `quantize.embedding.initted` (float 0/1 -> bool) |

`quantize.embedding.cluster_size` and `quantize.embedding.embed_avg` are never read by the reference forward pass
and are dropped, as are keys starting with `teacher`, `scaling` or `loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import BeitConfig, BeitModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.beit.modeling_beit import BeitEmbeddings
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_vqkd import VQKDConfig
from .initialization import check_finite_pixels, init_vit_module_, mark_residual_branches
from .quantizer import NormEMAVectorQuantizer, QuantizerOutput


@dataclass
class VQKDOutput(ModelOutput):
    """
    Output of [`VQKDModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `quantization_loss + reconstruction_loss`; only when `teacher_features` is given.
        reconstruction_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean over patches of `1 - cosine(reconstruction, teacher_features)`.
        quantization_loss (`torch.FloatTensor` of shape `()`):
            Commitment loss of the quantizer.
        codebook_indices (`torch.LongTensor` of shape `(batch_size, num_patches)`):
            The visual tokens.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_patches, teacher_dim)`):
            Decoder prediction of the teacher's patch features.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of this step's code histogram (all ranks).
        codebook_usage (`torch.FloatTensor` of shape `()`):
            Fraction of the codebook chosen at least once in this step's batch (all ranks).
        num_dead_codes (`torch.LongTensor` of shape `()`):
            See [`QuantizerOutput`].
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The encoder's hidden states, each `(batch_size, 1 + num_patches, encoder_hidden_size)`: the embeddings,
            then each block's output (the last one before the final LayerNorm).
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            The encoder's attention weights, each `(batch_size, num_heads, 1 + num_patches, 1 + num_patches)` (eager
            attention only). The decoder's are not returned: it reads quantized codes, so it is not part of what
            the tokenizer computes from an image.
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    quantization_loss: torch.Tensor | None = None
    codebook_indices: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    codebook_usage: torch.Tensor | None = None
    num_dead_codes: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# The tokenizer's ViTs use timm's `trunc_normal_(std=0.02)` with its default absolute cut-off of +-2 (unlike the
# MIM model's +-1 std): in practice a plain normal.
TOKENIZER_TRUNCATION = 2.0


def _init_conv_like_pytorch_(conv: nn.Conv2d) -> None:
    # The reference leaves the patch projection at PyTorch's default init.
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        fan_in = conv.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        init.uniform_(conv.bias, -bound, bound)


class VQKDViT(BeitModel):
    r"""
    The encoder / decoder ViT of the tokenizer: a [`BeitModel`] without pooler whose final LayerNorm is applied to
    every token (the reference's `fc_norm`), initialised like the reference: Linear, [CLS] and position embeddings
    normal(0, 0.02) (timm's `trunc_normal_` with its +-2 cut-off), LayerNorm (1, 0), patch projection PyTorch
    default, residual output weights of block `i` divided by `sqrt(2 i)`.
    """

    config_class = BeitConfig

    def __init__(self, config: BeitConfig) -> None:
        super().__init__(config, add_pooling_layer=False)

    def post_init(self) -> None:
        # `BeitModel.__init__` calls this once its layers exist and before the weights are initialised.
        mark_residual_branches(self.layers, first_layer_number=1)
        super().post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            # includes the residual rescale of the marked Linears
            init_vit_module_(module, std, truncation=TOKENIZER_TRUNCATION)
        elif isinstance(module, nn.Conv2d):
            _init_conv_like_pytorch_(module)
        elif isinstance(module, BeitEmbeddings):
            for tensor in (module.cls_token, module.position_embeddings):
                if tensor is not None:
                    init.trunc_normal_(tensor, std=std, a=-TOKENIZER_TRUNCATION, b=TOKENIZER_TRUNCATION)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, height, width)` -> LayerNorm'ed patch tokens `(batch, num_patches, hidden_size)`."""
        # Explicit flags: a config asking for hidden states or attentions must not make every call record them.
        return self(pixel_values, output_hidden_states=False, output_attentions=False).last_hidden_state[:, 1:]


class VQKDPreTrainedModel(PreTrainedModel):
    config: VQKDConfig
    config_class = VQKDConfig
    base_model_prefix = "vqkd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)  # type: ignore[assignment]  # transformers annotates str | list[str]; its own models use tuples
    supports_gradient_checkpointing = True
    _no_split_modules = ["BeitLayer"]
    _supports_sdpa = True

    # The reference runs the encode task layer and the quantizer in fp32 even when the rest is half precision. The
    # quantizer's float buffers are named (not the module): `initted` is a bool, which a module-wide entry would
    # load as a float.
    _keep_in_fp32_modules_strict = ["encode_task_layer", "quantizer.codebook", "quantizer.cluster_size"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init_vit_module_(module, self.config.initializer_range, truncation=TOKENIZER_TRUNCATION)
        elif isinstance(module, NormEMAVectorQuantizer):
            module.reset_codebook()


class VQKDModel(VQKDPreTrainedModel):
    r"""
    The VQ-KD tokenizer. `get_codebook_indices` turns images into visual tokens for masked image modeling;
    `forward` computes the training losses against teacher patch features (see `modeling_beitv2.teachers`).

    Pixels are plain [0, 1] images; the model maps them to its encoder's [-1, 1] itself. It shares `codebook_size`,
    `image_size`, `patch_grid` and `get_codebook_indices` with `DVAEModel`. The quantizer's EMA codebook update
    happens inside `forward` in training mode (it is not trained by the optimizer); its buffers are synchronised over
    `torch.distributed` ranks.

    Example:

    ```python
    >>> import torch
    >>> from modeling_beitv2 import VQKDConfig, VQKDModel
    >>> config = VQKDConfig.from_preset("tiny-decoder1", image_size=32, codebook_size=64, kmeans_init=False)
    >>> model = VQKDModel(config).eval()
    >>> model.get_codebook_indices(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 4])
    ```
    """

    def __init__(self, config: VQKDConfig) -> None:
        super().__init__(config)
        encoder_width, decoder_width = config.encoder_vit.hidden_size, config.decoder_vit.hidden_size
        self.encoder = VQKDViT(config.encoder_vit)
        # Built in fp32 whatever the default dtype (`_from_config(config, dtype=torch.float16)` builds under an fp16
        # default): `_keep_in_fp32_modules_strict` only acts when weights are loaded.
        fp32 = torch.float32
        self.encode_task_layer = nn.Sequential(
            nn.Linear(encoder_width, encoder_width, dtype=fp32),
            nn.Tanh(),
            nn.Linear(encoder_width, config.code_dim, dtype=fp32),
        )
        self.quantizer = NormEMAVectorQuantizer(
            codebook_size=config.codebook_size,
            code_dim=config.code_dim,
            decay=config.decay,
            beta=config.beta,
            kmeans_init=config.kmeans_init,
            dead_code_threshold=config.dead_code_threshold,
            dtype=fp32,
        )
        self.decoder = VQKDViT(config.decoder_vit)
        self.decode_task_layer = nn.Sequential(
            nn.Linear(decoder_width, decoder_width), nn.Tanh(), nn.Linear(decoder_width, config.teacher_dim)
        )
        self.post_init()

    @property
    def codebook_size(self) -> int:
        """Number of visual tokens (codebook entries)."""
        return self.config.codebook_size

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's patch embedding (a convolution: an image model has no token embedding table)."""
        return self.encoder.embeddings.patch_embeddings

    @property
    def image_size(self) -> int:
        """Side of the square images the encoder reads."""
        return cast(int, self.config.encoder_vit.image_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the code grid of one image."""
        return self.config.patch_grid

    def _encode_to_code_space(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | list[int] | None = False,
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        """Images -> the encode task layer's output `(batch, num_patches, code_dim)`, with the encoder's output."""
        # Pixels follow the encoder's dtype (a tokenizer loaded in bf16 keeps only the task layer and the quantizer
        # in fp32); under autocast the encoder's matmuls and attention run in half precision either way. The
        # [0, 1] -> [-1, 1] mapping (the reference's `pre_process`) runs in the input's dtype before that cast, so a
        # half-precision encoder rounds the mapped pixels once, not the raw and then the mapped ones.
        encoder_dtype = self.encoder.embeddings.patch_embeddings.projection.weight.dtype
        encoder_output = self.encoder(
            (pixel_values * 2 - 1).to(encoder_dtype),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        features = encoder_output.last_hidden_state[:, 1:]
        # The reference runs the task layer in fp32 with autocast off, so codes never see half precision.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.encode_task_layer(features.to(self.encode_task_layer[-1].weight.dtype)), encoder_output

    def _features_to_code_space(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._encode_to_code_space(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor) -> QuantizerOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images in [0, 1].

        Returns:
            [`QuantizerOutput`] with `quantized` of shape `(batch_size, num_patches, code_dim)` and `indices` of shape
            `(batch_size, num_patches)`. In training mode this updates the codebook.
        """
        return self.quantizer(self._features_to_code_space(pixel_values))

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Visual tokens of `pixel_values` (`(batch_size, 3, height, width)`, in [0, 1]) as a `(batch_size, num_patches)`
        int64 tensor. Touches no statistic of the quantizer, whatever the mode.

        Raises:
            RuntimeError: `pixel_values` holds NaN or infinity (whose every code would otherwise silently be 0).
                Checked on the device without waiting for it: at once on CPU, at the next synchronisation on GPU.
        """
        check_finite_pixels(pixel_values)
        return self.quantizer.lookup(self._features_to_code_space(pixel_values))

    def decode(self, indices: torch.Tensor | None = None, quantized: torch.Tensor | None = None) -> torch.Tensor:
        """
        Predict teacher features from codes: give either `indices` `(batch_size, num_patches)` or `quantized`
        `(batch_size, num_patches, code_dim)`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_patches, teacher_dim)` (empty for an empty batch).
        """
        if (indices is None) == (quantized is None):
            raise ValueError("Pass exactly one of `indices` or `quantized` to decode.")
        if quantized is None:
            quantized = self.quantizer.codebook[indices]
        batch_size, num_patches, code_dim = quantized.shape
        rows, cols = self.config.patch_grid
        if num_patches != rows * cols:
            raise ValueError(f"Expected {rows * cols} codes per image (grid {rows}x{cols}), got {num_patches}.")
        decoder_dtype = self.decoder.embeddings.patch_embeddings.projection.weight.dtype
        if batch_size == 0:
            # An empty batch decodes to an empty batch (BEiT's attention cannot reshape zero images).
            return quantized.new_zeros(0, num_patches, self.config.teacher_dim, dtype=decoder_dtype)
        code_grid = quantized.transpose(1, 2).reshape(batch_size, code_dim, rows, cols)
        return self.decode_task_layer(self.decoder.patch_features(code_grid.to(decoder_dtype)))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
    ) -> VQKDOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Images in [0, 1].
            teacher_features (`torch.FloatTensor` of shape `(batch_size, num_patches, teacher_dim)`, *optional*):
                Teacher patch targets of the same images (see `modeling_beitv2.teachers.TeacherForPatchTargets`).
                Without them only the quantization loss is computed and `loss` is `None`.
            output_hidden_states (`bool` or `list[int]`, *optional*, defaults to `config.output_hidden_states`):
                Return the encoder's hidden states (all of them, or those at the given indices).
            output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
                Return the encoder's attention weights (eager attention).
            return_dict (`bool`, *optional*, defaults to `config.return_dict`):
                Return a [`VQKDOutput`] rather than a tuple.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        # The encoder records its own hidden states and attentions (transformers' output capturing of its forward).
        code_space, encoder_output = self._encode_to_code_space(pixel_values, output_hidden_states, output_attentions)
        quantizer_output = self.quantizer(code_space)
        reconstruction = self.decode(quantized=quantizer_output.quantized)
        reconstruction_loss = loss = None
        if teacher_features is not None:
            if teacher_features.shape != reconstruction.shape:
                raise ValueError(
                    f"teacher_features has shape {tuple(teacher_features.shape)} but the tokenizer predicts "
                    f"{tuple(reconstruction.shape)} (batch, num_patches, teacher_dim={self.config.teacher_dim})."
                )
            cosine = nn.functional.cosine_similarity(reconstruction.float(), teacher_features.float(), dim=-1)
            reconstruction_loss = (1 - cosine).mean()
            loss = quantizer_output.loss + reconstruction_loss
        return VQKDOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            quantization_loss=quantizer_output.loss,
            codebook_indices=quantizer_output.indices,
            reconstruction=reconstruction,
            perplexity=quantizer_output.perplexity,
            codebook_usage=quantizer_output.codebook_usage,
            num_dead_codes=quantizer_output.num_dead_codes,
            hidden_states=encoder_output.hidden_states,
            attentions=encoder_output.attentions,
        )


__all__ = ["VQKDModel", "VQKDOutput", "VQKDPreTrainedModel", "VQKDViT"]
