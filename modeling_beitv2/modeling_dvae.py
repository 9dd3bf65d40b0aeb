"""The DALL-E discrete VAE (encoder and decoder), the visual tokenizer of BEiT (v1).

The module tree follows OpenAI's `dall_e` package so that its pickled weights map one to one:
`encoder.blocks.input`, `encoder.blocks.group_{g}.block_{b}.{id_path, res_path.conv_{1..4}}`,
`encoder.blocks.output.conv` (and the same under `decoder.`). DALL-E's convolutions store `w` / `b`; ours are
`nn.Conv2d` with `weight` / `bias`: rename `.w` -> `.weight` and `.b` -> `.bias`, nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_dvae import DVAEConfig
from .initialization import check_finite_pixels

_GROUP_COUNT = 4


@dataclass
class DVAEOutput(ModelOutput):
    """
    Output of [`DVAEModel.forward`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, codebook_size, rows, cols)`): encoder logits over the codes.
        codebook_indices (`torch.LongTensor` of shape `(batch_size, rows * cols)`): argmax codes.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): decoded pixels in [0, 1].
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The encoder's feature maps: the input convolution's output `(batch_size, hidden_size, H, W)`, then each
            of the 4 groups' output (`(batch_size, 8 * hidden_size, H / 8, W / 8)` for the last), as transformers'
            convolutional models (ResNet) return them.
    """

    logits: torch.Tensor | None = None
    codebook_indices: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DVAEConv2d(nn.Conv2d):
    """Odd-sized convolution with 'same' padding (DALL-E's `Conv2d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2)


class DVAEBlock(nn.Module):
    """Residual block: `id_path(x) + res_path(x) / num_layers**2`, where `res_path` is 4 ReLU-conv pairs."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        hidden = out_channels // 4
        self.post_gain = 1 / num_layers**2
        self.id_path = DVAEConv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        widths = (in_channels, hidden, hidden, hidden, out_channels)
        layers = []
        for index, kernel_size in enumerate(kernel_sizes):
            layers += [
                (f"relu_{index + 1}", nn.ReLU()),
                (f"conv_{index + 1}", DVAEConv2d(widths[index], widths[index + 1], kernel_size)),
            ]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.id_path(hidden_states) + self.post_gain * self.res_path(hidden_states)


def _group(blocks: list[tuple[str, nn.Module]], resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    return nn.Sequential(OrderedDict(blocks + ([resample] if resample else [])))


class DVAEEncoder(nn.Module):
    """Image `(batch, 3, H, W)` -> logits `(batch, codebook_size, H / 8, W / 8)`."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        n_hid, n_blk = config.hidden_size, config.num_blocks_per_group
        num_layers = _GROUP_COUNT * n_blk
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", DVAEConv2d(config.num_channels, n_hid, 7))]
        for g in range(_GROUP_COUNT):
            blocks: list[tuple[str, nn.Module]] = [
                (
                    f"block_{b + 1}",
                    DVAEBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], num_layers, (3, 3, 3, 1)),
                )
                for b in range(n_blk)
            ]
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < _GROUP_COUNT - 1 else None
            groups.append((f"group_{g + 1}", _group(blocks, pool)))
        groups.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict([("relu", nn.ReLU()), ("conv", DVAEConv2d(8 * n_hid, config.codebook_size, 1))])
                ),
            )
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns the logits and, with `output_hidden_states`, the input convolution's and each group's output."""
        hidden_states = pixel_values
        all_hidden_states = []
        for name, block in self.blocks.named_children():
            hidden_states = block(hidden_states)
            if output_hidden_states and name != "output":
                all_hidden_states.append(hidden_states)
        return hidden_states, tuple(all_hidden_states) if output_hidden_states else None


class DVAEDecoder(nn.Module):
    """One-hot codes `(batch, codebook_size, h, w)` -> pixel-distribution statistics `(batch, 6, 8 h, 8 w)`."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        n_hid, n_blk = config.hidden_size, config.num_blocks_per_group
        num_layers = _GROUP_COUNT * n_blk
        widths = [config.decoder_init_channels, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        groups: list[tuple[str, nn.Module]] = [
            ("input", DVAEConv2d(config.codebook_size, config.decoder_init_channels, 1))
        ]
        for g in range(_GROUP_COUNT):
            blocks: list[tuple[str, nn.Module]] = [
                (
                    f"block_{b + 1}",
                    DVAEBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], num_layers, (1, 3, 3, 3)),
                )
                for b in range(n_blk)
            ]
            upsample = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < _GROUP_COUNT - 1 else None
            groups.append((f"group_{g + 1}", _group(blocks, upsample)))
        groups.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict([("relu", nn.ReLU()), ("conv", DVAEConv2d(n_hid, 2 * config.num_channels, 1))])
                ),
            )
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, one_hot_codes: torch.Tensor) -> torch.Tensor:
        return self.blocks(one_hot_codes)


class DVAEPreTrainedModel(PreTrainedModel):
    config: DVAEConfig
    config_class = DVAEConfig
    base_model_prefix = "dvae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)  # type: ignore[assignment]  # transformers annotates str | list[str]; its own models use tuples

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # DALL-E's init: normal with std 1 / sqrt(fan_in), zero bias.
        if isinstance(module, nn.Conv2d):
            init.normal_(module.weight, mean=0.0, std=module.weight[0].numel() ** -0.5)
            init.zeros_(cast(torch.Tensor, module.bias))  # every convolution of the dVAE has a bias


class DVAEModel(DVAEPreTrainedModel):
    r"""
    The DALL-E dVAE as a tokenizer for BEiT (v1) masked image modeling.

    Inputs are plain [0, 1] pixels at `config.image_size` (112 px for BEiT); the model applies DALL-E's
    `map_pixels(x) = (1 - 2 eps) x + eps` (eps 0.1) itself. `get_codebook_indices` returns the argmax codes,
    `decode` turns codes back into [0, 1] pixels.

    Example:

    ```python
    >>> import torch
    >>> from modeling_beitv2 import DVAEConfig, DVAEModel
    >>> model = DVAEModel(DVAEConfig(codebook_size=64, hidden_size=16, num_blocks_per_group=1, image_size=32))
    >>> model.get_codebook_indices(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 16])
    ```
    """

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__(config)
        self.encoder = DVAEEncoder(config)
        self.decoder = DVAEDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's input convolution (a convolutional model has no token embedding table)."""
        return cast(nn.Module, self.encoder.blocks.input)

    @property
    def codebook_size(self) -> int:
        """Number of visual tokens (codebook entries)."""
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        """Side of the square images the encoder reads."""
        return self.config.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the code grid of one image."""
        return self.config.patch_grid

    def map_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the encoder's input range [eps, 1 - eps] (applied by `encode`, not by callers)."""
        eps = self.config.logit_laplace_eps
        return (1 - 2 * eps) * pixels + eps

    def unmap_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Inverse of `map_pixels`, clamped to [0, 1]."""
        eps = self.config.logit_laplace_eps
        return ((pixels - eps) / (1 - 2 * eps)).clamp(0, 1)

    def _encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        return self.encoder(self.map_pixels(pixel_values), output_hidden_states=output_hidden_states)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels `(batch, 3, H, W)` -> code logits `(batch, codebook_size, H / 8, W / 8)`."""
        return self._encode(pixel_values)[0]

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels `(batch, 3, H, W)` -> argmax codes `(batch, (H / 8) * (W / 8))`, int64.

        Raises:
            RuntimeError: `pixel_values` holds NaN or infinity (whose codes would otherwise silently be 0). Checked on
                the device without waiting for it: at once on CPU, at the next synchronisation on GPU.
        """
        check_finite_pixels(pixel_values)
        return self.encode(pixel_values).argmax(dim=1).flatten(1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """
        Codes `(batch, rows * cols)` (a square grid) -> pixels `(batch, 3, 8 rows, 8 cols)` in [0, 1]: the sigmoid of
        the decoder's first 3 output channels (the means of its logit-Laplace distribution), unmapped.
        """
        batch_size, num_positions = indices.shape
        side = int(round(num_positions**0.5))
        if side * side != num_positions:
            raise ValueError(f"decode expects a square grid of codes per image, got {num_positions}.")
        one_hot = nn.functional.one_hot(indices.view(batch_size, side, side), self.config.codebook_size)
        statistics = self.decoder(
            one_hot.permute(0, 3, 1, 2).to(cast(nn.Conv2d, self.decoder.blocks.input).weight.dtype)
        )
        return self.unmap_pixels(torch.sigmoid(statistics[:, : self.config.num_channels]))

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None) -> DVAEOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images in [0, 1].
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Return the encoder's feature maps.
            return_dict (`bool`, *optional*, defaults to `config.return_dict`):
                Return a [`DVAEOutput`] rather than a tuple.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        logits, hidden_states = self._encode(pixel_values, output_hidden_states=bool(output_hidden_states))
        indices = logits.argmax(dim=1).flatten(1)
        return DVAEOutput(
            logits=logits, codebook_indices=indices, reconstruction=self.decode(indices), hidden_states=hidden_states
        )


__all__ = ["DVAEModel", "DVAEOutput", "DVAEPreTrainedModel"]
