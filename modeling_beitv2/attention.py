"""Attention for BEiT v2: the relative position bias, and a fused FlexAttention implementation that applies it.

BEiT's attention adds a learnable per-head relative position bias to the attention scores. transformers' BEiT
passes it to the attention function as a float `attention_mask` of shape `(1, num_heads, seq_len, seq_len)`, so
the implementation named by `config._attn_implementation` decides how it is applied:

* `"eager"`: matmul, add, softmax, matmul (the reference computation);
* `"sdpa"` (the default): `torch.nn.functional.scaled_dot_product_attention` with the bias as a float mask, which
  keeps it off the flash kernel (a memory-efficient kernel with a bias input runs instead);
* `"beit_flex_attention"` (registered by this module): `torch.nn.attention.flex_attention` with the bias added
  inside the kernel by a `score_mod`, so the `(batch, heads, seq_len, seq_len)` scores are never materialised.
  transformers' own `"flex_attention"` cannot be used: its `score_mod` reads `attention_mask[batch][0][q][kv]`,
  head 0's bias for every head.

FlexAttention is only fast compiled. On accelerators `beit_flex_attention` calls a `torch.compile`d
`flex_attention` (compiled once per process, on first use); inside a compiled model it calls the plain function
and the outer graph fuses it; on CPU it runs PyTorch's unfused reference implementation, which has no backward
pass (train on CUDA). [`set_flex_attention_options`] sets the Triton kernel options (block sizes, warps, stages)
and the compile mode, e.g. for tuning on a GPU.

[`BeitV2RelativePositionBias`] computes the bias cheaply at the pretraining patch grid, and
[`resize_relative_position_bias_table`] resizes a bias table to another grid the way the reference fine-tuning
code does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.beit.modeling_beit import BeitConfig, BeitRelativePositionBias

BEIT_FLEX_ATTENTION = "beit_flex_attention"
"""The `attn_implementation` name of [`beit_flex_attention_forward`]."""

_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class FlexAttentionOptions:
    """Process-wide settings of [`beit_flex_attention_forward`].

    Args:
        kernel_options (`dict`, *optional*):
            Passed as `flex_attention(..., kernel_options=...)`: Triton tuning knobs such as `BLOCK_M`, `BLOCK_N`,
            `num_warps`, `num_stages` and their backward counterparts (`BLOCK_M1`, `BLOCK_N1`, `BLOCK_M2`,
            `BLOCK_N2`). `None` lets PyTorch choose.
        compile (`bool`, *optional*):
            Call a `torch.compile`d `flex_attention` outside compiled code. `None` (the default) compiles everywhere
            but on CPU, whose compiled kernel has no backward pass either and whose compilation is slow.
        compile_mode (`str`, *optional*):
            `torch.compile` mode of that standalone kernel, e.g. `"max-autotune-no-cudagraphs"` to let Inductor
            search the block sizes itself.
    """

    kernel_options: Mapping[str, Any] | None = None
    compile: bool | None = None
    compile_mode: str | None = None


_options = FlexAttentionOptions()


def set_flex_attention_options(
    kernel_options: Mapping[str, Any] | None = None, compile: bool | None = None, compile_mode: str | None = None
) -> FlexAttentionOptions:
    """Replace the process-wide [`FlexAttentionOptions`] of `beit_flex_attention`; returns the previous ones.

    Example: `set_flex_attention_options(kernel_options={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4})`.
    """
    global _options
    if kernel_options is not None and (
        not isinstance(kernel_options, Mapping) or not all(isinstance(key, str) for key in kernel_options)
    ):
        raise ValueError(
            f"kernel_options must be a mapping from option names (e.g. 'BLOCK_M') to values, got {kernel_options!r}."
        )
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (compile except on CPU), got {compile!r}.")
    if compile_mode not in _COMPILE_MODES:
        raise ValueError(f"Unknown compile_mode {compile_mode!r}; choose one of {list(_COMPILE_MODES)}.")
    previous = _options
    _options = FlexAttentionOptions(
        kernel_options=dict(kernel_options) if kernel_options is not None else None,
        compile=compile,
        compile_mode=compile_mode,
    )
    return previous


def get_flex_attention_options() -> FlexAttentionOptions:
    """The process-wide [`FlexAttentionOptions`] now in force."""
    return _options


@functools.cache
def _compiled_flex_attention(mode: str | None):
    # One compiled wrapper per mode for the whole process; `dynamic=False` because image models see a handful of
    # fixed sequence lengths and static shapes give the best kernels.
    return torch.compile(flex_attention, dynamic=False, mode=mode)


def _flex_attention_function(device_type: str):
    if torch.compiler.is_compiling():
        return flex_attention  # traced into the enclosing graph, which compiles it
    use_compiled = _options.compile if _options.compile is not None else device_type != "cpu"
    return _compiled_flex_attention(_options.compile_mode) if use_compiled else flex_attention


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive one: 0 where True, the lowest `dtype` value elsewhere (not
    -inf, so a fully masked row gives a uniform softmax rather than NaN). Float masks are returned as they are."""
    if attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.zeros_like(attention_mask, dtype=dtype).masked_fill(~attention_mask, torch.finfo(dtype).min)


def beit_flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """FlexAttention with an additive per-head bias applied as a `score_mod` (no materialised scores).

    Args:
        module: the calling attention module (unused; part of transformers' attention-function signature).
        query, key, value (`torch.Tensor` of shape `(batch, heads, seq_len, head_dim)`)
        attention_mask (`torch.Tensor`, *optional*): an additive float bias, or a boolean mask (True = attend),
            of shape `(batch or 1, heads or 1, seq_len, seq_len)`: BEiT's relative position bias. Gradients flow
            into it (and from there into the bias table).
        scaling (`float`, *optional*): score scale, `head_dim ** -0.5` when `None`.
        dropout (`float`): must be 0: FlexAttention has no attention-probability dropout.

    Returns:
        `(attn_output, None)` with `attn_output` of shape `(batch, seq_len, heads, head_dim)`; attention weights
        are never materialised.
    """
    if dropout > 0.0:
        raise ValueError(
            f"beit_flex_attention does not support attention dropout (got {dropout}); set "
            "attention_probs_dropout_prob=0.0 or use attn_implementation='sdpa' or 'eager'."
        )
    score_mod = None
    if attention_mask is not None:
        if attention_mask.ndim != 4:
            raise ValueError(
                f"beit_flex_attention expects a 4-D attention_mask (batch or 1, heads or 1, query_len, key_len), got "
                f"shape {tuple(attention_mask.shape)}."
            )
        bias = additive_mask(attention_mask)
        # Broadcast dimensions are indexed with a constant 0 so the kernel reads the small bias tensor as it is,
        # without an expanded copy.
        per_image, per_head = bias.shape[0] != 1, bias.shape[1] != 1

        def score_mod(score, batch_index, head_index, query_index, key_index):
            batch_index = batch_index if per_image else 0
            head_index = head_index if per_head else 0
            return score + bias[batch_index, head_index, query_index, key_index]

    attn_output = _flex_attention_function(query.device.type)(
        query, key, value, score_mod=score_mod, scale=scaling, kernel_options=_options.kernel_options
    )
    return attn_output.transpose(1, 2).contiguous(), None


AttentionInterface.register(BEIT_FLEX_ATTENTION, beit_flex_attention_forward)
# Padding masks reach it as eager attention's additive float masks (without a registered mask function,
# transformers would drop them for an unknown implementation).
AttentionMaskInterface.register(BEIT_FLEX_ATTENTION, eager_mask)


def relative_position_index(window_size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Row of the bias table for every (query, key) token pair of a `(rows, cols)` patch grid plus [CLS].

    The same index as transformers' `BeitRelativePositionBias.generate_relative_position_index`, built on `device`
    (that one is memoised, so calling it under a meta-device context, as `from_pretrained` builds models, would
    cache a meta tensor for every later caller).

    Returns:
        `torch.LongTensor` of shape `(1 + rows * cols, 1 + rows * cols)`: offset `(dy, dx)` maps to
        `(dy + rows - 1) * (2 * cols - 1) + dx + cols - 1`; then come [CLS]-to-token, token-to-[CLS] and
        [CLS]-to-[CLS].
    """
    rows, cols = window_size
    grid = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    coords = torch.stack(grid).flatten(1)  # (2, rows * cols)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, rows * cols, rows * cols)
    num_offsets = (2 * rows - 1) * (2 * cols - 1)
    index = torch.empty(rows * cols + 1, rows * cols + 1, dtype=torch.long, device=device)
    index[1:, 1:] = (offsets[0] + rows - 1) * (2 * cols - 1) + offsets[1] + cols - 1
    index[0, :] = num_offsets
    index[:, 0] = num_offsets + 1
    index[0, 0] = num_offsets + 2
    return index


class BeitV2RelativePositionBias(BeitRelativePositionBias):
    """transformers' `BeitRelativePositionBias` without the work that is a no-op at the pretraining patch grid.

    transformers bilinearly resizes the bias table to the requested grid on every call, even when the grid is the
    table's own (an identity resize, forward and backward), and builds the relative position index on the CPU. Here
    the index of the configured grid is a buffer on the model's device and, at that grid, the bias is a plain
    gather from the table. Other grids, and `interpolate_pos_encoding=True`, take transformers' path unchanged.
    """

    relative_position_index: torch.Tensor  # a buffer (registered in `__init__`)

    def __init__(self, config: BeitConfig) -> None:
        super().__init__(config)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)

    def forward(
        self, window_size: tuple[int, int], interpolate_pos_encoding: bool = False, dim_size: int | None = None
    ) -> torch.Tensor:
        """The bias `(1, num_heads, 1 + rows * cols, 1 + rows * cols)` for a `(rows, cols)` patch grid."""
        if interpolate_pos_encoding or tuple(window_size) != tuple(self.window_size):
            return super().forward(window_size, interpolate_pos_encoding=interpolate_pos_encoding, dim_size=dim_size)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (tokens, tokens, heads)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


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


__all__ = [
    "BEIT_FLEX_ATTENTION",
    "additive_mask",
    "BeitV2RelativePositionBias",
    "FlexAttentionOptions",
    "beit_flex_attention_forward",
    "resize_relative_position_bias_table",
    "get_flex_attention_options",
    "relative_position_index",
    "set_flex_attention_options",
]
