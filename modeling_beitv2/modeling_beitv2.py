"""BEiT v2 masked image modeling on top of transformers' BEiT building blocks.

`BeitV2Model` is transformers' `BeitModel` with the reference initialisation and a relative position bias computed
once per forward pass. `BeitV2ForMaskedImageModeling` adds the masked-token head (run on masked positions only) and
BEiT v2's patch-aggregation head; with `use_patch_aggregation=False` it is BEiT v1 masked image modeling.
The export of a pretrained backbone to a stock transformers `beit` model lives in `export_native.py`.

Attention implementations (`attn_implementation=` in `from_pretrained` / `_from_config` / the config, or
`model.set_attn_implementation(...)`): `"sdpa"` (the default), `"eager"` and `"beit_flex_attention"` (see
`attention.py`). transformers' `"flex_attention"` is refused: it would apply head 0's position bias to all heads.
"""

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import BeitModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.beit.modeling_beit import (
    BeitAttention,
    BeitEmbeddings,
    BeitLayer,
    BeitModelOutputWithPooling,
    BeitPreTrainedModel,
    BeitRelativePositionBias,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import (
    BEIT_FLEX_ATTENTION,
    BeitV2RelativePositionBias,
    additive_mask,
    relative_position_index,
)
from .configuration_beitv2 import BeitV2Config
from .initialization import init_vit_module_, mark_residual_branches, trunc_normal_one_std_


@dataclass
class BeitV2MaskedImageModelingOutput(ModelOutput):
    r"""
    Output of [`BeitV2ForMaskedImageModeling`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            `loss_mim + loss_aggregation` (just `loss_mim` without patch aggregation).
        loss_mim (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the main branch at masked positions (the reference logs it as `loss_1`).
        loss_aggregation (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the patch-aggregation head at masked positions (`loss_2`).
        logits (`torch.FloatTensor` of shape `(num_masked, vocab_size)`):
            Main-branch logits at the masked positions, in row-major order over `(batch, num_patches)`.
        aggregation_logits (`torch.FloatTensor` of shape `(num_masked, vocab_size)`, *optional*):
            Patch-aggregation-head logits at the same positions.
        mim_accuracy (`torch.FloatTensor` of shape `()`, *optional*):
            Fraction of masked positions whose main-branch argmax equals the label (`mlm_acc_1`).
        aggregation_accuracy (`torch.FloatTensor` of shape `()`, *optional*):
            The same for the aggregation head (`mlm_acc_2`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            Backbone hidden states, each `(batch, 1 + num_patches, hidden_size)`: the embeddings, then each block's
            output (the last one before the final LayerNorm); `None` in the places a selection of indices leaves out.
            The patch-aggregation head's blocks are not included.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Attention weights of each backbone block, `(batch, num_heads, 1 + num_patches, 1 + num_patches)`
            (eager attention only: the fused implementations never materialise them).
    """

    loss: torch.Tensor | None = None
    loss_mim: torch.Tensor | None = None
    loss_aggregation: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aggregation_logits: torch.Tensor | None = None
    mim_accuracy: torch.Tensor | None = None
    aggregation_accuracy: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class BeitV2PatchAggregationHead(nn.Module):
    """BEiT v2's patch-aggregation head: `head_layers` blocks over `[last-layer CLS, early patch tokens]`.

    Its blocks share the backbone's relative position bias. They are discarded after pretraining.
    """

    def __init__(self, config: BeitV2Config) -> None:
        super().__init__()
        # The reference draws the head's drop-path rates from the same linear ramp as the trunk, extended
        # if the head reaches past the last block, starting at index `early_layers`.
        # Computed on the CPU: under `torch.device("meta")` (how device_map, big-model loading and DeepSpeed ZeRO-3
        # build models) a tensor on the default device has no values to read.
        ramp_length = max(config.num_hidden_layers, config.early_layers + config.head_layers)
        rates = torch.linspace(0, config.drop_path_rate, ramp_length, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [BeitLayer(config, drop_path_rate=rates[config.early_layers + j]) for j in range(config.head_layers)]
        )
        # The reference builds these blocks after its init pass: they keep PyTorch's default Linear init, then
        # get the residual rescale of layers early_layers + 1, early_layers + 2, ...
        mark_residual_branches(self.layers, config.early_layers + 1, keep_torch_default_init=True)
        if not config.shared_lm_head:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        last_cls_token: torch.Tensor,
        early_patch_tokens: torch.Tensor,
        relative_position_bias: torch.Tensor | None,
        resolution: tuple[int, int],
    ) -> torch.Tensor:
        """Returns the head's output tokens `(batch, 1 + num_patches, hidden_size)`, before any LayerNorm."""
        hidden_states = torch.cat([last_cls_token, early_patch_tokens], dim=1)
        for layer in self.layers:
            # Positional, as in the backbone (see `BeitV2Model.encode`): reentrant gradient checkpointing returns
            # gradients only for positional tensor inputs.
            hidden_states = layer(hidden_states, relative_position_bias, resolution=resolution)
        return hidden_states


class BeitV2PreTrainedModel(BeitPreTrainedModel):
    """Holds the reference initialisation shared by the BEiT v2 backbone and its MIM model."""

    config: BeitV2Config
    config_class = BeitV2Config
    base_model_prefix = "beit"
    # Lets transformers accept "beit_flex_attention" (a name containing "flex_attention" is checked against this
    # flag); transformers' own "flex_attention" is refused in `get_correct_attn_implementation`.
    _supports_flex_attn = True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention == "flex_attention":
            raise ValueError(
                "attn_implementation='flex_attention' is not supported: transformers' flex_attention adds head 0's "
                f"relative position bias to every head. Use '{BEIT_FLEX_ATTENTION}' (FlexAttention with the per-head "
                "bias), 'sdpa' or 'eager'."
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            init_vit_module_(module, std)
        elif isinstance(module, BeitEmbeddings):
            trunc_normal_one_std_(module.cls_token, std)
            if module.mask_token is not None:
                trunc_normal_one_std_(module.mask_token, std)
            if module.position_embeddings is not None:
                trunc_normal_one_std_(module.position_embeddings, std)
        elif isinstance(module, BeitRelativePositionBias):
            init.zeros_(module.relative_position_bias_table)
            if isinstance(module, BeitV2RelativePositionBias):
                # A non-persistent buffer: `from_pretrained` leaves it uninitialised on purpose.
                init.copy_(module.relative_position_index, relative_position_index(module.window_size, "cpu"))
        elif isinstance(module, BeitLayer):
            if isinstance(module.lambda_1, nn.Parameter):
                init.constant_(module.lambda_1, self.config.layer_scale_init_value)
                init.constant_(cast(nn.Parameter, module.lambda_2), self.config.layer_scale_init_value)  # as lambda_1


class BeitV2Pooler(nn.Module):
    """The image representation of BEiT v2's linear probe, read from the final-normalised tokens
    `(batch, 1 + num_patches, hidden_size)` -> `(batch, hidden_size)`: the [CLS] token for a model pretrained with
    patch aggregation (which trains [CLS] to aggregate the image), else the mean of the patch tokens (paper, section
    3.2). Parameter-free, so a pretraining checkpoint has everything it needs."""

    def __init__(self, config: BeitV2Config) -> None:
        super().__init__()
        self.use_cls_token = config.use_patch_aggregation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0] if self.use_cls_token else hidden_states[:, 1:].mean(dim=1)


class BeitV2Model(BeitV2PreTrainedModel, BeitModel):
    r"""
    The BEiT v2 backbone: transformers' [`BeitModel`] (same inputs, weights and outputs) with the reference
    initialisation — truncated normal (std `initializer_range`, cut at ±1 std) for every Linear, Conv, [CLS] and
    [MASK], and the attention output and second MLP weight of block `i` divided by `sqrt(2 i)`.

    Its relative position biases skip transformers' per-call identity resize at the configured image size; the
    shared one is computed once per forward pass (or passed in, see `encode`).

    On its own (as `AutoModel` loads it from a pretraining checkpoint) it ends with the pretraining model's final
    LayerNorm (`layernorm`, the MIM model's top-level `layernorm` in the checkpoint, found there by transformers'
    base-model-prefix handling) and its `pooler_output` is the linear probe's representation ([`BeitV2Pooler`]).
    Inside [`BeitV2ForMaskedImageModeling`] it has neither: the MIM model normalises masked positions only.

    Inputs: `pixel_values` `(batch, num_channels, height, width)`, optional `bool_masked_pos`
    `(batch, num_patches)`. Outputs: `last_hidden_state` `(batch, 1 + num_patches, hidden_size)` (after the final
    LayerNorm), `pooler_output` `(batch, hidden_size)`, and with `output_hidden_states` / `output_attentions` the
    embeddings and every block's output (before the final LayerNorm) / every block's attention weights (eager
    attention only).
    """

    def __init__(self, config: BeitV2Config, add_pooling_layer: bool = True, add_final_layernorm: bool = True) -> None:
        # Read by `post_init`, which `BeitModel.__init__` calls before the weights are initialised.
        self._add_final_layernorm = add_final_layernorm
        super().__init__(config, add_pooling_layer=add_pooling_layer)

    def post_init(self) -> None:
        # `BeitModel.__init__` calls this once its layers exist and before the weights are initialised: swap in
        # the cheaper bias modules (same parameters, same state-dict keys), the final LayerNorm (`BeitModel` has an
        # Identity there, as `use_mean_pooling` must stay True) and the parameter-free probe pooler before the init
        # pass sees them.
        if self.shared_position_bias is not None:
            self.shared_position_bias = BeitV2RelativePositionBias(self.config)
        for layer in self.layers:
            if layer.relative_position_bias is not None:
                layer.relative_position_bias = BeitV2RelativePositionBias(self.config)
        if self._add_final_layernorm:
            self.layernorm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        if self.pooler is not None:
            self.pooler = BeitV2Pooler(self.config)  # type: ignore[assignment]  # in place of BeitModel's BeitPooler
        mark_residual_branches(self.layers, first_layer_number=1)
        super().post_init()

    def compute_shared_position_bias(
        self, resolution: tuple[int, ...], interpolate_pos_encoding: bool = False
    ) -> torch.Tensor | None:
        """The shared relative position bias `(1, num_heads, 1 + num_patches, 1 + num_patches)` for images of
        `resolution = (height, width)` pixels, or `None` when the config has no shared bias."""
        if self.shared_position_bias is None:
            return None
        height, width = resolution
        patch_size = cast(int, self.config.patch_size)  # BEiT v2 patches are square
        window = (height // patch_size, width // patch_size)
        return self.shared_position_bias(
            window, interpolate_pos_encoding=interpolate_pos_encoding, dim_size=1 + window[0] * window[1]
        )

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BeitModelOutputWithPooling:
        r"""
        Same inputs as [`BeitModel.forward`]; `output_hidden_states` (a flag, or the indices of the hidden states to
        keep) and `output_attentions` are recorded by transformers' output capturing. The blocks run in [`encode`].
        """
        hidden_states, _ = self.encode(
            pixel_values,
            bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            **kwargs,
        )
        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BeitModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)

    def encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        shared_position_bias: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        keep_hidden_state: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Embeddings and blocks, without the final LayerNorm and the pooler. Hidden states and attentions are recorded
        by the output capturing of the calling `forward` (this model's or the MIM model's), only when asked for.

        `shared_position_bias` (`(1, num_heads, 1 + num_patches, 1 + num_patches)`, from
        `compute_shared_position_bias`) lets a caller reuse the bias; it is computed here when `None`.
        `keep_hidden_state` (`int`, *optional*) names one hidden state to hand back (`i`: the output of the first
        `i` blocks, 0 the embeddings), as the patch-aggregation head needs one, without recording the others.

        Returns the last block's output `(batch, 1 + num_patches, hidden_size)` and the kept hidden state (same
        shape), or `None`.
        """
        for flag in ("output_hidden_states", "output_attentions"):
            kwargs.pop(flag, None)  # recorded by hooks, not passed down
        embedding_output = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        resolution = pixel_values.shape[2:]
        # A tensor or None, never a flex `BlockMask`: BEiT's flex attention takes the eager mask (see `attention.py`).
        attention_mask = cast(
            "torch.Tensor | None",
            create_bidirectional_mask(
                config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
            ),
        )
        if attention_mask is not None:
            # SDPA's padding masks are boolean; `BeitModel` adds them to the float bias as they are (+1 where tokens
            # should be kept, nothing masked).
            attention_mask = additive_mask(attention_mask, embedding_output.dtype)
        if shared_position_bias is None:
            shared_position_bias = self.compute_shared_position_bias(resolution, interpolate_pos_encoding)
        if shared_position_bias is not None:
            attention_mask = shared_position_bias if attention_mask is None else shared_position_bias + attention_mask

        hidden_states = embedding_output
        kept = hidden_states if keep_hidden_state == 0 else None
        for index, layer in enumerate(self.layers):
            # The bias goes in positionally: reentrant gradient checkpointing (`use_reentrant=True`) returns gradients
            # only for positional tensor inputs; as a keyword argument the shared bias, computed once outside the
            # checkpointed layers, would be backpropagated through once per layer ("backward through the graph a
            # second time"), which is why transformers' BEiT skips those tests.
            hidden_states = layer(
                hidden_states,
                attention_mask,
                interpolate_pos_encoding=interpolate_pos_encoding,
                resolution=resolution,
                **kwargs,
            )
            if index + 1 == keep_hidden_state:
                kept = hidden_states
        return hidden_states, kept


def _num_patches_for(pixel_values: torch.Tensor, patch_size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    patch_h, patch_w = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    height, width = pixel_values.shape[-2:]
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by patch size {patch_h}x{patch_w}; "
            "resize or crop the images to a multiple of the patch size."
        )
    return height // patch_h, width // patch_w


def _select_masked(tokens: torch.Tensor, bool_masked_pos: torch.Tensor, masked_index: torch.Tensor | None):
    """Masked rows of `tokens` `(batch, num_patches, ...)` in row-major order: `(num_masked, ...)`.

    With `masked_index` `(batch, K)` (ascending positions per image) this is a gather of static size; without it,
    boolean indexing, whose output size depends on the mask's values (a host-device synchronisation).
    """
    if masked_index is None:
        return tokens[bool_masked_pos]
    index = masked_index.view(*masked_index.shape, *([1] * (tokens.ndim - 2))).expand(-1, -1, *tokens.shape[2:])
    return tokens.gather(1, index).flatten(0, 1)


class BeitV2ForMaskedImageModeling(BeitV2PreTrainedModel):
    r"""
    BEiT v2 masked image modeling: predict the visual token (e.g. a VQ-KD code) of every masked patch.

    The backbone replaces masked patch embeddings by a learned [MASK] embedding; the final LayerNorm and
    `lm_head` run on masked positions only. With `config.use_patch_aggregation`, a second head sees the
    last layer's [CLS] with the patch tokens after `config.early_layers` blocks and predicts the same tokens,
    which forces [CLS] to aggregate global information. Without it, this is BEiT v1 masked image modeling, with
    the same weights and outputs as transformers' `BeitForMaskedImageModeling` (except that we only compute
    logits at masked positions).

    A batch without any masked patch gives `loss = 0` (still attached to the graph so `backward()` works and
    gradients are zero) and accuracies of 0, instead of the NaN a mean over zero positions would give.

    With `num_masked_patches` (the same count in every image, as BEiT's mask generators guarantee) the forward pass
    has static shapes and no host-device synchronisation, and compiles to one graph; outputs are identical.
    """

    # Hidden states and attentions are the backbone's (recorded by its own `_can_record_outputs` through the
    # capturing of this model's `forward`); the patch-aggregation head's blocks, which are this model's own
    # `BeitLayer`s, are left out.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(BeitLayer, layer_name="beit.layers"),
        "attentions": OutputRecorder(BeitAttention, index=1, layer_name="beit.layers"),
    }

    def __init__(self, config: BeitV2Config) -> None:
        super().__init__(config)
        # The final LayerNorm is this model's own `layernorm` (transformers' `BeitForMaskedImageModeling` layout),
        # applied to masked positions only.
        self.beit = BeitV2Model(config, add_pooling_layer=False, add_final_layernorm=False)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.aggregation_head = BeitV2PatchAggregationHead(config) if config.use_patch_aggregation else None
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        # Saved custom code maps only the saved class; `AutoModel` on a MIM checkpoint should give its backbone
        # with `trust_remote_code=True` too, as it does where this package is installed.
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{BeitV2Model.__module__.rsplit('.', 1)[-1]}.{BeitV2Model.__name__}")
            self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)

    def _check_inputs(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        labels: torch.Tensor | None,
        num_masked_patches: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Validated `(bool_masked_pos (batch, num_patches), masked_index (batch, K) or None, masked labels or None)`.
        With `num_masked_patches` the host checks shapes only; the count is asserted on the device, without waiting."""
        rows, cols = _num_patches_for(pixel_values, self.config.patch_size)
        batch_size, num_patches = pixel_values.shape[0], rows * cols
        if bool_masked_pos is None:
            raise ValueError("bool_masked_pos is required: a (batch, num_patches) boolean mask of patches to predict.")
        if tuple(bool_masked_pos.shape) == (batch_size, rows, cols):
            bool_masked_pos = bool_masked_pos.flatten(1)
        if tuple(bool_masked_pos.shape) != (batch_size, num_patches):
            raise ValueError(
                f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}; expected ({batch_size}, {num_patches}) "
                f"for {batch_size} images of {rows}x{cols} patches."
            )
        bool_masked_pos = bool_masked_pos.bool()
        masked_index = None
        if num_masked_patches is not None:
            if isinstance(num_masked_patches, bool) or not isinstance(num_masked_patches, int):
                raise ValueError(f"num_masked_patches must be an int or None, got {num_masked_patches!r}.")
            if not 0 <= num_masked_patches <= num_patches:
                raise ValueError(f"num_masked_patches must lie in [0, {num_patches}], got {num_masked_patches}.")
            torch._assert_async(
                (bool_masked_pos.sum(dim=1) == num_masked_patches).all(),
                f"bool_masked_pos must mask exactly num_masked_patches={num_masked_patches} patches in every image.",
            )
            # A stable descending sort puts each image's masked positions first, in increasing order: the
            # row-major order of boolean indexing, with a static output size.
            order = torch.argsort(bool_masked_pos.to(torch.uint8), dim=1, descending=True, stable=True)
            masked_index = order[:, :num_masked_patches]
        if labels is not None:
            if tuple(labels.shape) == (batch_size, num_patches):
                labels = _select_masked(labels, bool_masked_pos, masked_index)
            else:
                # The dynamic path needs the count to check the shape; the static path knows it.
                num_masked = (
                    int(bool_masked_pos.sum())
                    if masked_index is None
                    else batch_size * cast(int, num_masked_patches)  # masked_index is set only with it
                )
                if labels.ndim != 1 or labels.shape[0] != num_masked:
                    raise ValueError(
                        f"labels has shape {tuple(labels.shape)}; expected the full code grid ({batch_size}, "
                        f"{num_patches}) or the codes of the {num_masked} masked patches ({num_masked},)."
                    )
            labels = labels.long()
        return bool_masked_pos, masked_index, labels

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_masked_patches: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BeitV2MaskedImageModelingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`):
                Images normalised as the image processor does (ImageNet mean/std for BEiT v2).
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, num_patches)` or `(batch, rows, cols)`):
                True where a patch is masked and must be predicted.
            labels (`torch.LongTensor` of shape `(batch, num_patches)` or `(num_masked,)`, *optional*):
                Visual tokens: the full grid a tokenizer returns, or only the codes of masked patches in
                row-major order.
            num_masked_patches (`int`, *optional*):
                The number of masked patches in EVERY image (`num_masked = batch * num_masked_patches`). Selects
                the static-shape path: no host-device synchronisation, one graph under `torch.compile`, same
                outputs. A mask with another count fails a device-side assertion (raised at the next
                synchronisation on GPU, at once on CPU). Leave it `None` for masks of varying counts.
            output_hidden_states (`bool` or `list[int]`, *optional*, defaults to `config.output_hidden_states`):
                Return the backbone's hidden states (all of them, or those at the given indices).
            output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
                Return the backbone's attention weights (eager attention).
            return_dict (`bool`, *optional*, defaults to `config.return_dict`):
                Return a [`BeitV2MaskedImageModelingOutput`] rather than a tuple.
        """
        bool_masked_pos, masked_index, labels = self._check_inputs(
            pixel_values, bool_masked_pos, labels, num_masked_patches
        )
        aggregation_head = self.aggregation_head

        # Computed once, shared by every backbone block and the aggregation head.
        resolution = tuple(pixel_values.shape[2:])
        shared_position_bias = self.beit.compute_shared_position_bias(resolution)
        # Before the final LayerNorm; hidden states and attentions are recorded by hooks only when asked for, the
        # aggregation head's input is handed back without recording anything.
        sequence_output, early_output = self.beit.encode(
            pixel_values,
            bool_masked_pos,
            shared_position_bias=shared_position_bias,
            keep_hidden_state=self.config.early_layers if aggregation_head is not None else None,
            **kwargs,
        )
        masked_output = _select_masked(sequence_output[:, 1:], bool_masked_pos, masked_index)
        logits = self.lm_head(self.layernorm(masked_output))

        aggregation_logits = None
        if aggregation_head is not None:
            head_output = aggregation_head(
                sequence_output[:, :1],
                cast(torch.Tensor, early_output)[:, 1:],  # kept: `keep_hidden_state` was given
                shared_position_bias,
                resolution,
            )
            masked_head_output = _select_masked(head_output[:, 1:], bool_masked_pos, masked_index)
            if self.config.shared_lm_head:
                aggregation_logits = self.lm_head(self.layernorm(masked_head_output))
            else:
                aggregation_logits = aggregation_head.lm_head(aggregation_head.layernorm(masked_head_output))

        loss = loss_mim = loss_aggregation = mim_accuracy = aggregation_accuracy = None
        if labels is not None:
            loss_mim, mim_accuracy = _masked_token_loss(logits, labels)
            loss = loss_mim
            if aggregation_logits is not None:
                loss_aggregation, aggregation_accuracy = _masked_token_loss(aggregation_logits, labels)
                loss = loss_mim + loss_aggregation

        return BeitV2MaskedImageModelingOutput(
            loss=loss,
            loss_mim=loss_mim,
            loss_aggregation=loss_aggregation,
            logits=logits,
            aggregation_logits=aggregation_logits,
            mim_accuracy=mim_accuracy,
            aggregation_accuracy=aggregation_accuracy,
        )


def _masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over masked positions; zero (not NaN) when nothing is masked."""
    if labels.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = nn.functional.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return loss, accuracy
