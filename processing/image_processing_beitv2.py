"""Image processor for masked image modeling with BEiT v2 (and BEiT v1): two views of one crop plus a patch mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .random_state import ProcessLocalRNG
from .settings_cache import SettingsCache
from .transforms import (
    ColorJitter,
    RandomHorizontalFlip,
    TwoViewRandomResizedCrop,
    center_square_box,
    make_image_list,
    to_float_array,
    to_pil_image,
)

logger = logging.get_logger(__name__)

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
# A setting of earlier versions: the tokenizer view is now plain [0, 1] and each tokenizer maps it itself.
_REMOVED_TOKENIZER_PIXEL_MAPPING = "tokenizer_pixel_mapping"
_MASK_TYPES = ("blockwise", "random")


class BeitV2ImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    patch_size: int
    interpolation: str
    tokenizer_image_size: int
    tokenizer_interpolation: str
    mask_type: str
    mask_ratio: float
    num_masking_patches: int
    min_num_patches: int
    max_num_patches: int
    min_aspect: float
    max_aspect: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    color_jitter: float
    seed: int


class BeitV2ImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for masked image modeling: a backbone view, a tokenizer view of the same crop, and a patch mask.

    - Evaluation (default): the central square (side = shorter side) resized to `image_size` (backbone) and to
      `tokenizer_image_size` (tokenizer), i.e. "resize shorter side, center-crop" with one resampling per view.
    - Training (`do_augment=True`), the reference recipe: ColorJitter(`color_jitter` for brightness, contrast and
      saturation; no hue), horizontal flip (p = 0.5), then ONE random resized crop box (`crop_scale`, `crop_ratio`)
      resampled to both views.

    The default is BEiT v2; `BeitV2ImageProcessor.for_beit_v1()` gives BEiT v1's settings.

    Args:
        image_size (`int`, defaults to 224): Side of the backbone view.
        patch_size (`int`, defaults to 16): Patch size of the backbone; the mask grid is `image_size // patch_size`.
        interpolation (`str`, defaults to "bicubic"): Resampling filter of the backbone view.
        image_mean, image_std (`tuple[float, float, float]`, defaults to ImageNet's): Backbone view normalisation.
        tokenizer_image_size (`int`, defaults to 224): Side of the tokenizer view (112 for DALL-E).
        tokenizer_interpolation (`str`, defaults to "bicubic"): Resampling filter of the tokenizer view.
        mask_type (`str`, defaults to "blockwise"): "blockwise" (`BlockwiseMaskGenerator`) or "random".
        mask_ratio (`float`, defaults to 0.4): Fraction of patches masked; `num_masking_patches` wins if given.
        num_masking_patches (`int`, *optional*): Exact masked count (the reference recipe uses 75 of 196).
        min_num_patches, max_num_patches, min_aspect, max_aspect: Blockwise-masking parameters (see
            `BlockwiseMaskGenerator`).
        crop_scale (`tuple[float, float]`, defaults to `(0.2, 1.0)`): Area range of the training crop.
        crop_ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Aspect-ratio range of the training crop.
        color_jitter (`float`, defaults to 0.4): Brightness/contrast/saturation jitter strength in training.
        seed (`int` or `numpy.random.Generator`, *optional*): Seed of the RNG shared by augmentation and masking
            (not saved; independent per DataLoader worker, see `ProcessLocalRNG`).

    Settings can be changed afterwards (`processor.mask_ratio = 0.5`) or for one call (`processor(images,
    mask_ratio=0.5)`), as with transformers' processors.

    Calling it returns a `BatchFeature` with, per image:
        - `pixel_values`: `(3, image_size, image_size)` float32, normalised with `image_mean`/`image_std`;
        - `tokenizer_pixel_values`: `(3, tokenizer_image_size, tokenizer_image_size)` float32 in [0, 1], not
          normalised: the visual tokenizers (`VQKDModel`, `DVAEModel`) map plain pixels to their input range
          themselves;
        - `bool_masked_pos`: `(num_patches,)` bool, row-major over the patch grid, `True` = masked.
    They are lists (one entry per image) or, with `return_tensors="np"`/`"pt"`, stacked along a batch axis.
    """

    model_input_names = ["pixel_values", "tokenizer_pixel_values", "bool_masked_pos"]
    valid_kwargs = BeitV2ImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        interpolation: str = "bicubic",
        image_mean: tuple[float, float, float] = IMAGENET_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_STD,
        tokenizer_image_size: int = 224,
        tokenizer_interpolation: str = "bicubic",
        mask_type: str = "blockwise",
        mask_ratio: float = 0.4,
        num_masking_patches: int | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        seed: int | np.random.Generator | None = None,
        **kwargs,
    ):
        if _REMOVED_TOKENIZER_PIXEL_MAPPING in kwargs:
            # Saved configs of earlier versions hold it; the tokenizers now own their input mapping.
            logger.warning(
                f"`{_REMOVED_TOKENIZER_PIXEL_MAPPING}` is deprecated and ignored: `tokenizer_pixel_values` are plain "
                "[0, 1] pixels, which VQKDModel and DVAEModel map to their own input range."
            )
            kwargs.pop(_REMOVED_TOKENIZER_PIXEL_MAPPING)
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.interpolation = interpolation
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.tokenizer_image_size = int(tokenizer_image_size)
        self.tokenizer_interpolation = tokenizer_interpolation
        self.mask_type = mask_type
        self.mask_ratio = mask_ratio
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.min_aspect = min_aspect
        self.max_aspect = max_aspect
        self.crop_scale = [float(v) for v in crop_scale]
        self.crop_ratio = [float(v) for v in crop_ratio]
        self.color_jitter = float(color_jitter)
        self._rng = ProcessLocalRNG(seed)
        # Built from the settings at use time, so attribute changes and per-call settings take effect.
        self._transforms = SettingsCache(_TRANSFORM_SETTINGS, _build_transforms)
        self._transforms.get(self)  # bad settings fail here rather than at the first image

    @classmethod
    def for_beit_v1(cls, **kwargs) -> BeitV2ImageProcessor:
        """
        BEiT v1 settings: backbone view normalised with mean = std = 0.5, tokenizer view for the DALL-E dVAE
        (112 px, lanczos), crop scale (0.08, 1) as in BEiT v1's pretraining script. `kwargs` override.
        """
        settings = {
            "image_mean": (0.5, 0.5, 0.5),
            "image_std": (0.5, 0.5, 0.5),
            "tokenizer_image_size": 112,
            "tokenizer_interpolation": "lanczos",
            "crop_scale": (0.08, 1.0),
        }
        settings.update(kwargs)
        return cls(**settings)

    @property
    def mask_generator(self) -> BlockwiseMaskGenerator | RandomMaskGenerator:
        """The mask generator built from the current masking settings; `preprocess` draws with the processor's RNG."""
        return self._transforms.get(self).mask_generator

    @property
    def num_patches(self) -> int:
        return self._transforms.get(self).mask_generator.num_patches

    def set_seed(self, seed: int | np.random.Generator | None) -> None:
        """Restarts the RNG shared by augmentation and masking from `seed`."""
        self._rng = ProcessLocalRNG(seed)

    def to_dict(self) -> dict[str, Any]:
        # Private attributes are runtime state (RNG, transform objects) rebuilt from the public settings.
        return {key: value for key, value in super().to_dict().items() if not key.startswith("_")}

    def preprocess(
        self, images, do_augment: bool = False, return_tensors: str | None = None, **settings
    ) -> BatchFeature:
        """
        Args:
            images: One image or a list/batch of images (PIL, numpy, torch; any PIL mode; any size).
            do_augment (`bool`, defaults to `False`): Training augmentation instead of the evaluation crop.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any constructor setting except `seed` (e.g. `mask_ratio=0.5`), for this call only.
        """
        mean = np.asarray(settings.pop("image_mean", self.image_mean), dtype=np.float32)[:, None, None]
        std = np.asarray(settings.pop("image_std", self.image_std), dtype=np.float32)[:, None, None]
        transforms = self._transforms.get(self, **settings)
        rng = self._rng.generator
        outputs = {name: [] for name in self.model_input_names}
        for raw in make_image_list(images):
            image = to_pil_image(raw)
            if do_augment:
                image = transforms.flip(transforms.color_jitter(image, rng), rng)
                view, tokenizer_view = transforms.two_view_crop(image, rng)
            else:
                view, tokenizer_view = transforms.two_view_crop.apply_box(image, center_square_box(*image.size))
            outputs["pixel_values"].append((to_float_array(view) - mean) / std)
            outputs["tokenizer_pixel_values"].append(to_float_array(tokenizer_view))
            outputs["bool_masked_pos"].append(transforms.mask_generator(rng).reshape(-1))
        if return_tensors is not None:
            outputs = {name: np.stack(values) for name, values in outputs.items()}
        return BatchFeature(data=outputs, tensor_type=return_tensors)


@dataclass(frozen=True)
class _Transforms:
    mask_generator: BlockwiseMaskGenerator | RandomMaskGenerator
    color_jitter: ColorJitter
    flip: RandomHorizontalFlip
    two_view_crop: TwoViewRandomResizedCrop


# What `_build_transforms` reads; `image_mean`/`image_std` are applied directly in `preprocess`.
_TRANSFORM_SETTINGS = (
    "image_size",
    "patch_size",
    "interpolation",
    "tokenizer_image_size",
    "tokenizer_interpolation",
    "mask_type",
    "mask_ratio",
    "num_masking_patches",
    "min_num_patches",
    "max_num_patches",
    "min_aspect",
    "max_aspect",
    "crop_scale",
    "crop_ratio",
    "color_jitter",
)


def _build_transforms(
    image_size: int,
    patch_size: int,
    interpolation: str,
    tokenizer_image_size: int,
    tokenizer_interpolation: str,
    mask_type: str,
    mask_ratio: float,
    num_masking_patches: int | None,
    min_num_patches: int,
    max_num_patches: int | None,
    min_aspect: float,
    max_aspect: float | None,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    color_jitter: float,
) -> _Transforms:
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if mask_type not in _MASK_TYPES:
        raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
    grid = (image_size // patch_size,) * 2
    if mask_type == "blockwise":
        mask_generator = BlockwiseMaskGenerator(
            grid, mask_ratio, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect
        )
    else:
        mask_generator = RandomMaskGenerator(grid, mask_ratio, num_masking_patches)
    color_jitter = float(color_jitter)
    return _Transforms(
        mask_generator=mask_generator,
        color_jitter=ColorJitter(color_jitter, color_jitter, color_jitter),
        flip=RandomHorizontalFlip(0.5),
        two_view_crop=TwoViewRandomResizedCrop(
            int(image_size),
            int(tokenizer_image_size),
            tuple(crop_scale),
            tuple(crop_ratio),
            interpolation,
            tokenizer_interpolation,
        ),
    )
