"""BEiT v2 masked image modeling on top of transformers' BEiT building blocks.

`BeitV2Model` is transformers' `BeitModel` with the reference initialisation. `BeitV2ForMaskedImageModeling`
adds the masked-token head (run on masked positions only) and BEiT v2's patch-aggregation head; with
`use_patch_aggregation=False` it is BEiT v1 masked image modeling. `convert_mim_to_native_beit` turns a
pretrained backbone into a stock transformers `beit` model for fine-tuning, so fine-tuned checkpoints need no
custom code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BeitConfig, BeitModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.beit.modeling_beit import (
    BeitEmbeddings,
    BeitLayer,
    BeitPreTrainedModel,
    BeitRelativePositionBias,
)
from transformers.utils import ModelOutput

from .configuration_beitv2 import BeitV2Config
from .initialization import init_vit_module_, mark_residual_branches, trunc_normal_one_std_

# Config fields that only make sense for pretraining; dropped when exporting to a native `beit` model.
_MIM_ONLY_CONFIG_KEYS = ("use_patch_aggregation", "early_layers", "head_layers", "shared_lm_head")


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
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            Backbone hidden states, each `(batch, 1 + num_patches, hidden_size)`: the embeddings, then each block's
            output (the last one before the final LayerNorm).
    """

    loss: torch.FloatTensor | None = None
    loss_mim: torch.FloatTensor | None = None
    loss_aggregation: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    aggregation_logits: torch.FloatTensor | None = None
    mim_accuracy: torch.FloatTensor | None = None
    aggregation_accuracy: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class BeitV2PatchAggregationHead(nn.Module):
    """BEiT v2's patch-aggregation head: `head_layers` blocks over `[last-layer CLS, early patch tokens]`.

    Its blocks share the backbone's relative position bias. They are discarded after pretraining.
    """

    def __init__(self, config: BeitV2Config) -> None:
        super().__init__()
        # The reference draws the head's drop-path rates from the same linear ramp as the trunk, extended
        # if the head reaches past the last block, starting at index `early_layers`.
        ramp_length = max(config.num_hidden_layers, config.early_layers + config.head_layers)
        rates = torch.linspace(0, config.drop_path_rate, ramp_length).tolist()
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
            hidden_states = layer(hidden_states, attention_mask=relative_position_bias, resolution=resolution)
        return hidden_states


class BeitV2PreTrainedModel(BeitPreTrainedModel):
    """Holds the reference initialisation shared by the BEiT v2 backbone and its MIM model."""

    config: BeitV2Config
    config_class = BeitV2Config
    base_model_prefix = "beit"

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
        elif isinstance(module, BeitLayer):
            if isinstance(module.lambda_1, nn.Parameter):
                init.constant_(module.lambda_1, self.config.layer_scale_init_value)
                init.constant_(module.lambda_2, self.config.layer_scale_init_value)


class BeitV2Model(BeitV2PreTrainedModel, BeitModel):
    r"""
    The BEiT v2 backbone: transformers' [`BeitModel`] (same forward, same outputs) with the reference
    initialisation — truncated normal (std `initializer_range`, cut at ±1 std) for every Linear, Conv, [CLS] and
    [MASK], and the attention output and second MLP weight of block `i` divided by `sqrt(2 i)`.

    Inputs: `pixel_values` `(batch, num_channels, height, width)`, optional `bool_masked_pos`
    `(batch, num_patches)`. Output: `last_hidden_state` `(batch, 1 + num_patches, hidden_size)`.
    """

    def __init__(self, config: BeitV2Config, add_pooling_layer: bool = False) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)

    def post_init(self) -> None:
        # `BeitModel.__init__` calls this once its layers exist and before the weights are initialised.
        mark_residual_branches(self.layers, first_layer_number=1)
        super().post_init()


def _patch_grid(config: BeitConfig) -> tuple[int, int]:
    image_size, patch_size = config.image_size, config.patch_size
    image_h, image_w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    patch_h, patch_w = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    return image_h // patch_h, image_w // patch_w


def _num_patches_for(pixel_values: torch.Tensor, patch_size: int | tuple[int, int]) -> tuple[int, int]:
    patch_h, patch_w = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    height, width = pixel_values.shape[-2:]
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by patch size {patch_h}x{patch_w}; "
            "resize or crop the images to a multiple of the patch size."
        )
    return height // patch_h, width // patch_w


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
    """

    def __init__(self, config: BeitV2Config) -> None:
        super().__init__(config)
        self.beit = BeitV2Model(config, add_pooling_layer=False)
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
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Validated `(bool_masked_pos (batch, num_patches), masked labels or None, (rows, cols) patch grid)`."""
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
        if labels is not None:
            num_masked = int(bool_masked_pos.sum())
            if tuple(labels.shape) == (batch_size, num_patches):
                labels = labels[bool_masked_pos]
            elif labels.ndim != 1 or labels.shape[0] != num_masked:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}; expected the full code grid ({batch_size}, "
                    f"{num_patches}) or the codes of the {num_masked} masked patches ({num_masked},)."
                )
            labels = labels.long()
        return bool_masked_pos, labels, (rows, cols)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
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
            output_hidden_states (`bool`, *optional*):
                Return the backbone's hidden states.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        bool_masked_pos, labels, window = self._check_inputs(pixel_values, bool_masked_pos, labels)
        use_aggregation = self.aggregation_head is not None

        outputs = self.beit(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=bool(output_hidden_states) or use_aggregation,
        )
        sequence_output = outputs.last_hidden_state  # before the final LayerNorm
        logits = self.lm_head(self.layernorm(sequence_output[:, 1:][bool_masked_pos]))

        aggregation_logits = None
        if use_aggregation:
            resolution = pixel_values.shape[2:]
            relative_position_bias = self.beit.shared_position_bias(window, dim_size=sequence_output.shape[1])
            head_output = self.aggregation_head(
                sequence_output[:, :1],
                outputs.hidden_states[self.config.early_layers][:, 1:],
                relative_position_bias,
                resolution,
            )
            masked_head_output = head_output[:, 1:][bool_masked_pos]
            if self.config.shared_lm_head:
                aggregation_logits = self.lm_head(self.layernorm(masked_head_output))
            else:
                aggregation_logits = self.aggregation_head.lm_head(self.aggregation_head.layernorm(masked_head_output))

        loss = loss_mim = loss_aggregation = mim_accuracy = aggregation_accuracy = None
        if labels is not None:
            loss_mim, mim_accuracy = _masked_token_loss(logits, labels)
            loss = loss_mim
            if aggregation_logits is not None:
                loss_aggregation, aggregation_accuracy = _masked_token_loss(aggregation_logits, labels)
                loss = loss_mim + loss_aggregation

        hidden_states = outputs.hidden_states if output_hidden_states else None
        output = BeitV2MaskedImageModelingOutput(
            loss=loss,
            loss_mim=loss_mim,
            loss_aggregation=loss_aggregation,
            logits=logits,
            aggregation_logits=aggregation_logits,
            mim_accuracy=mim_accuracy,
            aggregation_accuracy=aggregation_accuracy,
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()


def _masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over masked positions; zero (not NaN) when nothing is masked."""
    if labels.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = nn.functional.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


def _geometric_offset_positions(source_size: int, target_size: int) -> torch.Tensor:
    """Positions of the `source_size` source offsets on the integer target offset axis `-(target_size // 2)..`.

    The reference BEiT fine-tuning loaders place source offset `i` at `sum(q**j for j < i)` (mirrored for negative
    offsets) with `q` bisected in `[1.01, 1.5]`, so near offsets stay about 1 apart and only far ones stretch.
    """
    half_source, half_target = source_size // 2, target_size // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2.0
        if (1.0 - ratio**half_source) / (1.0 - ratio) > half_target:
            high = ratio
        else:
            low = ratio
    steps = torch.tensor([ratio**power for power in range(half_source)], dtype=torch.float64)
    positive = torch.cumsum(steps, dim=0)
    return torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive])


def _not_a_knot_spline_matrix(knots: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`(len(targets), len(knots))` float64 matrix mapping values at `knots` to the not-a-knot cubic spline
    interpolant evaluated at `targets` (clamped to the knot range, as FITPACK's evaluator does).

    With fewer than 4 knots the spline degenerates to the interpolating polynomial of degree `len(knots) - 1`.
    """
    num_knots = knots.shape[0]
    targets = targets.clamp(knots[0], knots[-1])
    if num_knots < 4:
        # Lagrange basis: column k is prod_{m != k} (t - x_m) / (x_k - x_m).
        differences = targets[:, None, None] - knots[None, None, :]
        denominators = knots[:, None] - knots[None, :]
        off_diagonal = ~torch.eye(num_knots, dtype=torch.bool)
        ratios = torch.where(off_diagonal, differences / torch.where(off_diagonal, denominators, 1.0), 1.0)
        return ratios.prod(dim=-1)
    widths = knots[1:] - knots[:-1]
    # Second derivatives M solve S M = R y: continuity of the first derivative at interior knots, plus a
    # continuous third derivative at the second and second-to-last knots (not-a-knot ends).
    system = torch.zeros(num_knots, num_knots, dtype=torch.float64)
    rhs = torch.zeros(num_knots, num_knots, dtype=torch.float64)
    system[0, :3] = torch.stack([widths[1], -(widths[0] + widths[1]), widths[0]])
    system[-1, -3:] = torch.stack([widths[-1], -(widths[-2] + widths[-1]), widths[-2]])
    for row in range(1, num_knots - 1):
        left, right = widths[row - 1], widths[row]
        system[row, row - 1 : row + 2] = torch.stack([left, 2.0 * (left + right), right])
        rhs[row, row - 1 : row + 2] = 6.0 * torch.stack([1.0 / left, -(1.0 / left + 1.0 / right), 1.0 / right])
    second_derivatives = torch.linalg.solve(system, rhs)
    interval = torch.searchsorted(knots[1:-1], targets, right=True)
    width = widths[interval]
    after = (targets - knots[interval]) / width
    before = 1.0 - after
    rows = torch.arange(targets.shape[0])
    values = torch.zeros(targets.shape[0], num_knots, dtype=torch.float64)
    values[rows, interval] = before
    values[rows, interval + 1] += after
    curvature = ((before**3 - before)[:, None] * second_derivatives[interval]) + (
        (after**3 - after)[:, None] * second_derivatives[interval + 1]
    )
    return values + curvature * (width**2 / 6.0)[:, None]


def resize_relative_position_bias_table(
    table: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a BEiT relative position bias table to another patch grid.

    The table holds one row per 2-D offset `(dy, dx)` with `dy in [-(h-1), h-1]`, `dx in [-(w-1), w-1]`, laid
    out row-major over a `(2h-1, 2w-1)` grid, followed by 3 rows for the [CLS] interactions. Each axis of the
    offset grid is resized like the official BEiT / BEiT v2 fine-tuning code does: the source offsets are placed
    on a geometric progression (`1, 1 + q, 1 + q + q**2, ...` and mirrored, `q` chosen so the largest one just
    passes the largest target offset) and the bias is read at the integer target offsets from a cubic
    interpolating spline through them (the not-a-knot spline that `scipy.interpolate.interp2d(kind="cubic")`
    fits), one axis after the other. Offset (0, 0) keeps its value, near offsets keep nearly theirs; an axis
    whose size does not change is left as is, and the [CLS] rows are copied.

    Args:
        table (`torch.Tensor` of shape `((2h-1)(2w-1) + 3, num_heads)`)
        source_window, target_window: `(rows, cols)` of the patch grids.

    Returns:
        `torch.Tensor` of shape `((2H-1)(2W-1) + 3, num_heads)`, in `table`'s dtype (computed in float64).
    """
    src_h, src_w = 2 * source_window[0] - 1, 2 * source_window[1] - 1
    dst_h, dst_w = 2 * target_window[0] - 1, 2 * target_window[1] - 1
    if table.shape[0] != src_h * src_w + 3:
        raise ValueError(
            f"Relative position bias table has {table.shape[0]} rows; a {source_window} patch grid needs "
            f"{src_h * src_w + 3}."
        )
    if (src_h, src_w) == (dst_h, dst_w):
        return table.clone()
    # The reference's geometric-progression resize, not a plain resize of the offset grid: the latter stretches
    # the near offsets that matter most and hurt ADE20K fine-tuning (microsoft/unilm issue 376).
    axis_operators = []
    for source_size, target_size in ((src_h, dst_h), (src_w, dst_w)):
        if source_size == target_size:
            axis_operators.append(torch.eye(source_size, dtype=torch.float64))
            continue
        half_target = target_size // 2
        targets = torch.arange(-half_target, half_target + 1, dtype=torch.float64)
        knots = _geometric_offset_positions(source_size, target_size)
        axis_operators.append(_not_a_knot_spline_matrix(knots, targets))
    row_operator, column_operator = (operator.to(table.device) for operator in axis_operators)
    offsets, cls_rows = table[:-3], table[-3:]
    grid = offsets.reshape(src_h, src_w, -1).to(torch.float64)
    resized = torch.einsum("ti,ijh,sj->tsh", row_operator, grid, column_operator)
    return torch.cat([resized.reshape(dst_h * dst_w, -1).to(table.dtype), cls_rows], dim=0)


def convert_mim_to_native_beit(
    model: BeitV2ForMaskedImageModeling | BeitV2Model,
    model_class: type[PreTrainedModel] = BeitModel,
    image_size: int | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """Export a pretrained BEiT v2 / BEiT backbone as a stock transformers `beit` model for fine-tuning.

    The shared relative position bias is copied into every layer (resized with
    :func:`resize_relative_position_bias_table` when `image_size` differs), the [MASK] embedding, the final
    LayerNorm, `lm_head` and the patch-aggregation head are dropped. The result loads and saves with plain
    transformers (`model_type: "beit"`), so pipelines and Hub widgets need no custom code.

    Args:
        model: A BEiT v2 MIM model or backbone.
        model_class: The transformers class to build, e.g. `BeitModel`, `BeitForImageClassification` or
            `BeitForSemanticSegmentation`.
        image_size: Fine-tuning resolution (defaults to the pretraining one).
        config_overrides: Extra `BeitConfig` fields (`num_labels`, `id2label`, `drop_path_rate`, `out_indices`...).

    Returns:
        A `model_class` instance whose backbone weights come from `model`; heads keep transformers' init.
    """
    backbone = model.beit if isinstance(model, BeitV2ForMaskedImageModeling) else model
    source_config = backbone.config
    config_dict = source_config.to_dict()
    # Backbone feature selection is recomputed from `out_indices`/`out_features` overrides, if any.
    derived = ("model_type", "architectures", "auto_map", "transformers_version", "out_features", "out_indices")
    for key in (*_MIM_ONLY_CONFIG_KEYS, *derived, "stage_names"):
        config_dict.pop(key, None)
    config_dict.update(
        use_mask_token=False,
        use_relative_position_bias=source_config.use_shared_relative_position_bias
        or source_config.use_relative_position_bias,
        use_shared_relative_position_bias=False,
        use_mean_pooling=True,
    )
    if image_size is not None:
        config_dict["image_size"] = image_size
    config_dict.update(config_overrides)
    native = model_class(BeitConfig(**config_dict))

    source_state = backbone.state_dict()
    target_prefix = "beit." if hasattr(native, "beit") else ""
    source_window = _patch_grid(source_config)
    target_window = _patch_grid(native.config)
    new_state = {}
    for name, tensor in source_state.items():
        if name == "embeddings.mask_token" or name.startswith("pooler."):
            continue
        if name == "shared_position_bias.relative_position_bias_table":
            resized = resize_relative_position_bias_table(tensor, source_window, target_window)
            for index in range(native.config.num_hidden_layers):
                new_state[f"{target_prefix}layers.{index}.relative_position_bias.relative_position_bias_table"] = (
                    resized.clone()
                )
            continue
        if name.endswith(".relative_position_bias.relative_position_bias_table"):
            tensor = resize_relative_position_bias_table(tensor, source_window, target_window)
        if name == "embeddings.position_embeddings" and source_window != target_window:
            tensor = _resize_absolute_position_embeddings(tensor, source_window, target_window)
        new_state[target_prefix + name] = tensor

    missing, unexpected = native.load_state_dict(new_state, strict=False)
    backbone_prefixes = (f"{target_prefix}embeddings.", f"{target_prefix}layers.")
    backbone_missing = [key for key in missing if key.startswith(backbone_prefixes)]
    if unexpected or backbone_missing:
        raise ValueError(
            f"Export to {model_class.__name__} left backbone keys unaccounted for: "
            f"missing={backbone_missing}, unexpected={unexpected}."
        )
    return native


def _resize_absolute_position_embeddings(
    position_embeddings: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of `(1, 1 + h*w, dim)` absolute position embeddings, keeping the [CLS] row."""
    cls_row, grid = position_embeddings[:, :1], position_embeddings[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *source_window, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid.float(), size=target_window, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, math.prod(target_window), dim).to(position_embeddings.dtype)
    return torch.cat([cls_row, grid], dim=1)
