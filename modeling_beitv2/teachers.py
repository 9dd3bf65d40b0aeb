"""Teacher patch features for training the VQ-KD tokenizer, from any transformers vision model.

The teacher sees the same crop as the tokenizer, given here in [0, 1], normalised with the teacher's own
mean/std. Its targets are, as in the reference:

* CLIP (`CLIPVisionModelWithProjection`): the final `post_layernorm` applied to every token, then the visual
  projection, patch tokens only (`projection_dim` features, 512 for ViT-B/16);
* DINO / ViT (`ViTModel`) and DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`): the final LayerNorm'ed tokens,
  without [CLS] and register tokens (`hidden_size` features).

The teacher is frozen, in eval mode and always runs without gradients. Like the reference teachers, it
interpolates its position embeddings, so the tokenizer may train at another resolution than the teacher's own.
"""

from __future__ import annotations

import inspect
from typing import cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection, PreTrainedModel
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)

_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")


class TeacherForPatchTargets(nn.Module):
    r"""
    A frozen vision model that turns `[0, 1]` images into per-patch regression targets.

    Args:
        model (`PreTrainedModel`): a `CLIPVisionModelWithProjection` or a ViT-like model whose `last_hidden_state`
            is the final-LayerNorm'ed token sequence ([CLS], optional register tokens, then patches).
        image_mean, image_std (`tuple[float, float, float]`): the teacher's input normalisation.
    """

    # Buffers (registered in `__init__`).
    image_mean: torch.Tensor
    image_std: torch.Tensor

    def __init__(self, model: PreTrainedModel, image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.is_clip = isinstance(model, CLIPVisionModelWithProjection)
        vision_config = model.config
        self.patch_size = int(vision_config.patch_size)
        self.feature_dim = int(vision_config.projection_dim if self.is_clip else vision_config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)
        # CLIP and ViT refuse inputs of another size than their config's unless asked to interpolate; DINOv2
        # always interpolates and has no such argument.
        backbone = cast(nn.Module, model.vision_model) if self.is_clip else model
        accepts_flag = "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters
        self.backbone_kwargs = {"interpolate_pos_encoding": True} if accepts_flag else {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> TeacherForPatchTargets:
        """Load a teacher by Hub name or local path (`kwargs` go to the model's `from_pretrained`).

        The normalisation is read from the image processor saved with the model; without one it falls back to the
        OpenAI CLIP constants for CLIP models and to the ImageNet ones otherwise.
        """
        # Where to read from (cache, revision, token) applies to the config and the processor too, not only the weights.
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        is_clip = config.model_type in _CLIP_MODEL_TYPES
        model_class = CLIPVisionModelWithProjection if is_clip else AutoModel
        model = model_class.from_pretrained(name_or_path, **kwargs)
        try:
            # Only the statistics are needed: reading the saved dict does not build a processor (whose class may need
            # torchvision, or fall back to another backend with a warning).
            processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_kwargs)
        except OSError:
            processor_dict = {}
        image_mean, image_std = processor_dict.get("image_mean"), processor_dict.get("image_std")
        if image_mean is None or image_std is None:
            image_mean, image_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
        return cls(model, tuple(image_mean), tuple(image_std))

    def train(self, mode: bool = True) -> TeacherForPatchTargets:
        # A teacher never leaves eval mode, even inside a model put in training mode.
        super().train(False)
        return self

    def patch_grid(self, image_size: int) -> tuple[int, int]:
        """(rows, columns) of the teacher's patch grid for square images of `image_size` pixels."""
        return image_size // self.patch_size, image_size // self.patch_size

    def check_compatible(self, vqkd_config, image_size: int) -> None:
        """Raise `ValueError` if, at `image_size` pixels, this teacher's feature size or patch grid does not match a
        `VQKDConfig`. The teacher's own training resolution does not matter: it interpolates its position embeddings.
        """
        if self.feature_dim != vqkd_config.teacher_dim:
            raise ValueError(
                f"The teacher's feature size is {self.feature_dim} but the tokenizer's teacher_dim is "
                f"{vqkd_config.teacher_dim}; set VQKDConfig(teacher_dim={self.feature_dim})."
            )
        if image_size % self.patch_size:
            # the teacher's patch embedding would silently drop the border pixels and misalign its patches
            raise ValueError(
                f"image_size {image_size} is not a multiple of the teacher's patch size {self.patch_size}."
            )
        if self.patch_grid(image_size) != tuple(vqkd_config.patch_grid):
            raise ValueError(
                f"At {image_size} px the teacher's patch grid is {self.patch_grid(image_size)} (patch size "
                f"{self.patch_size}) but the tokenizer's is {tuple(vqkd_config.patch_grid)}."
            )

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images in [0, 1].

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_patches, feature_dim)`.
        """
        normalised = (pixel_values.float() - self.image_mean) / self.image_std
        if self.is_clip:
            tokens = self.model.vision_model(pixel_values=normalised, **self.backbone_kwargs).last_hidden_state
            tokens = self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))
        else:
            tokens = self.model(pixel_values=normalised, **self.backbone_kwargs).last_hidden_state
        return tokens[:, self.num_prefix_tokens :]


__all__ = ["TeacherForPatchTargets"]
