"""Image processor of BEiT v2 (and BEiT v1): the evaluation view for inference, and on request the masked image
modeling inputs of pretraining (two views of one crop plus a patch mask)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs

from .augmentation import TwoViewAugmentation
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .processor_settings import (
    SettingsMixin,
    batch_feature,
    check_augmentation_overrides,
    check_view_size,
    normalisation,
    read_images,
    resolve_rng,
)
from .transforms import RandomResizedCrop, center_square_box, resample_filter, to_float_array

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
_MASK_TYPES = ("blockwise", "random")
# The settings `_build_mask_generator` reads.
_MASK_SETTINGS = (
    "image_size",
    "patch_size",
    "mask_type",
    "mask_ratio",
    "num_masking_patches",
    "min_num_patches",
    "max_num_patches",
    "min_aspect",
    "max_aspect",
)
# The settings of the evaluation view (`preprocess`); each can be overridden for one call.
_EVALUATION_SETTINGS = ("image_size", "interpolation", "image_mean", "image_std")
# The settings `pretraining_inputs` reads; each can be overridden for one call.
_PRETRAINING_SETTINGS = tuple(
    dict.fromkeys((*_EVALUATION_SETTINGS, "tokenizer_image_size", "tokenizer_interpolation", *_MASK_SETTINGS))
)
# The settings `training_augmentation` reads, by TwoViewAugmentation's argument names.
_AUGMENTATION_SETTINGS = (
    "image_size",
    "tokenizer_image_size",
    "crop_scale",
    "crop_ratio",
    "interpolation",
    "tokenizer_interpolation",
    "color_jitter",
)
_TO_PRETRAINING = (
    "the tokenizer view and the mask are pretraining inputs: "
    "`processor.pretraining_inputs(images, rng=generator)` (training views: add "
    "`augmentation=processor.training_augmentation()`)."
)
_TO_AUGMENTATION = (
    "the crop and colour settings configure the training augmentation: build it with "
    "`processor.training_augmentation(crop_scale=...)` and pass it to `pretraining_inputs(..., augmentation=...)`."
)
# Where the arguments of the other methods go, for the error messages of `pretraining_inputs` and `preprocess`.
_PRETRAINING_ELSEWHERE = dict.fromkeys(_AUGMENTATION_SETTINGS, _TO_AUGMENTATION)
_PREPROCESS_ELSEWHERE = {
    **_PRETRAINING_ELSEWHERE,
    **dict.fromkeys(("augmentation", "rng", *_PRETRAINING_SETTINGS), _TO_PRETRAINING),
}


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


class BeitV2ImageProcessor(SettingsMixin, BaseImageProcessor):
    r"""
    Image processor of BEiT v2 (and BEiT v1) backbones.

    **Inference** (how pipelines, the Hub widget and `AutoImageProcessor` users call it): `processor(images)` returns
    only `pixel_values`, the deterministic evaluation view: the central square (side = shorter side) resized to
    `image_size`, normalised with `image_mean` / `image_std`. No mask, no tokenizer view: a backbone fed these
    features sees the whole image.

    **Pretraining** (masked image modeling) asks for its inputs by name:
    `processor.pretraining_inputs(images, rng=generator, augmentation=processor.training_augmentation())` returns
    `pixel_values` (backbone view), `tokenizer_pixel_values` (the same crop for the visual tokenizer) and
    `bool_masked_pos` (the patch mask). Without `augmentation` the views are the evaluation views (validation,
    visualisation); the masks (and the augmentation) always draw from `rng`, which has no default, so that every
    call site decides where its randomness comes from (e.g. one generator per example derived from the run seed
    and the example's position). `training_augmentation()` is the reference recipe built from this processor's
    settings (a `TwoViewAugmentation`): ColorJitter(`color_jitter` for brightness, contrast and saturation; no
    hue), horizontal flip (p = 0.5), then ONE random resized crop box (`crop_scale`, `crop_ratio`) resampled to
    both views.

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
        do_convert_rgb (`bool`, defaults to `True`): Convert every image to RGB (alpha composited over white); with
            `False`, `processor(images)` keeps the images' own channels (`image_mean` / `image_std` then need one
            value per channel). The pretraining inputs are always RGB: the tokenizers read RGB.

    Settings can be changed afterwards (`processor.mask_ratio = 0.5`) or for one call, as with transformers'
    processors: `processor(images, image_size=...)` takes the evaluation view's settings (`image_size`,
    `interpolation`, `image_mean`, `image_std`) and the standard `do_convert_rgb`, `input_data_format` and
    `return_tensors`; `pretraining_inputs` also takes the tokenizer view's and the mask's. The training-only settings
    (`crop_scale`, `crop_ratio`, `color_jitter`) are overridden in `training_augmentation(crop_scale=...)`.

    Inputs: PIL images (any mode), numpy arrays or torch tensors (`(H, W)`, `(H, W, C)` or `(C, H, W)`; uint8, or
    float in [0, 1]), one or a list / batch. Outputs, per image:
        - `pixel_values`: `(3, image_size, image_size)` float32, normalised with `image_mean` / `image_std`;
        - from `pretraining_inputs` only: `tokenizer_pixel_values`, `(3, tokenizer_image_size,
          tokenizer_image_size)` float32 in [0, 1], not normalised (the visual tokenizers, `VQKDModel` and
          `DVAEModel`, map plain pixels to their input range themselves); `bool_masked_pos`, `(num_patches,)` bool,
          row-major over the patch grid, `True` = masked.
    They are lists (one entry per image) or, with `return_tensors="np"` / `"pt"`, stacked along a batch axis.
    """

    # What `__call__` returns (the evaluation view), as for any transformers image processor.
    model_input_names = ["pixel_values"]
    # What `pretraining_inputs` returns: the inputs of `BeitV2ForMaskedImageModeling` and its tokenizer.
    pretraining_input_names = ["pixel_values", "tokenizer_pixel_values", "bool_masked_pos"]
    valid_kwargs = BeitV2ImageProcessorKwargs
    # A class attribute too: transformers' tests (and callers) look for the standard argument on the class.
    do_convert_rgb = True
    _evaluation_settings = _EVALUATION_SETTINGS
    _preprocess_elsewhere = _PREPROCESS_ELSEWHERE

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        interpolation: str = "bicubic",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
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
        do_convert_rgb: bool | None = True,
        **kwargs,
    ):
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
        # None (a config or call that leaves it unset) means the default, as in transformers.
        self.do_convert_rgb = True if do_convert_rgb is None else bool(do_convert_rgb)
        # Bad settings fail here rather than at the first image.
        _build_mask_generator(**{name: getattr(self, name) for name in _MASK_SETTINGS})
        self.training_augmentation()

    @classmethod
    def for_beit_v1(cls, **kwargs) -> BeitV2ImageProcessor:
        """
        BEiT v1 settings: backbone view normalised with mean = std = 0.5, tokenizer view for the DALL-E dVAE
        (112 px, lanczos), crop scale (0.08, 1) as in BEiT v1's pretraining script. `kwargs` override.
        """
        settings: dict[str, Any] = {
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
        """The mask generator of the current masking settings (`pretraining_inputs` draws from it with its `rng`)."""
        return _build_mask_generator(**{name: getattr(self, name) for name in _MASK_SETTINGS})

    @property
    def num_patches(self) -> int:
        return self.mask_generator.num_patches

    def training_augmentation(self, **overrides) -> TwoViewAugmentation:
        """
        The pretraining augmentation of this processor's current settings, as a `TwoViewAugmentation` to pass to
        `pretraining_inputs(images, augmentation=..., rng=...)`.

        Args:
            overrides: Any of `image_size`, `tokenizer_image_size`, `crop_scale`, `crop_ratio`, `interpolation`,
                `tokenizer_interpolation`, `color_jitter`, for this augmentation only.
        """
        check_augmentation_overrides(overrides, _AUGMENTATION_SETTINGS)
        return TwoViewAugmentation(
            **{name: overrides.get(name, getattr(self, name)) for name in _AUGMENTATION_SETTINGS}
        )

    def _evaluation_transform(self, current: Mapping[str, Any]) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
        """The evaluation view of `preprocess` (settings: `image_size`, `interpolation`)."""
        size, resample = int(current["image_size"]), resample_filter(current["interpolation"])
        return lambda plane: _central_square(plane, size, resample)

    def pretraining_inputs(
        self,
        images,
        *,
        rng: np.random.Generator | int,
        augmentation: TwoViewAugmentation | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = None,
        **settings,
    ) -> BatchFeature:
        """
        The masked image modeling inputs of each image: backbone view, tokenizer view of the same crop, patch mask.

        Args:
            images: One image or a list/batch of images (PIL, numpy, torch; any PIL mode; any size); read as RGB.
            rng (`numpy.random.Generator` or `int`): Generator of the augmentation and the masks (or its seed),
                drawn from image after image. Required: give each call (or each example) its own generator.
            augmentation (`Callable[[PIL.Image.Image, numpy.random.Generator], tuple[PIL.Image.Image,
                PIL.Image.Image]]`, *optional*): Produces the backbone and tokenizer views of each image, e.g.
                `self.training_augmentation()`; by default the deterministic evaluation views.
            input_data_format (`str` or `ChannelDimension`, *optional*): "channels_first" or "channels_last" for
                array inputs; inferred by default.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: For this call only: the view sizes and filters, `image_mean`, `image_std`, `patch_size` and
                the masking settings.

        Returns:
            `BatchFeature` with `pixel_values`, `tokenizer_pixel_values` and `bool_masked_pos` (see the class
            docstring).
        """
        current = self._call_settings("pretraining_inputs", settings, _PRETRAINING_SETTINGS, _PRETRAINING_ELSEWHERE)
        mask_generator = _build_mask_generator(**{name: current[name] for name in _MASK_SETTINGS})
        mean, std = normalisation(current["image_mean"], current["image_std"], 3)
        sizes = {"backbone": int(current["image_size"]), "tokenizer": int(current["tokenizer_image_size"])}
        resample = {
            "backbone": resample_filter(current["interpolation"]),
            "tokenizer": resample_filter(current["tokenizer_interpolation"]),
        }
        rng = resolve_rng(rng)
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in self.pretraining_input_names}
        for image in read_images(images, True, input_data_format):
            views: Sequence[Any]
            if augmentation is None:
                views = [_central_square(image, sizes[view], resample[view]) for view in sizes]
            else:
                views = _checked_views(augmentation(image, rng), sizes)
            outputs["pixel_values"].append((to_float_array(views[0]) - mean) / std)
            outputs["tokenizer_pixel_values"].append(to_float_array(views[1]))
            outputs["bool_masked_pos"].append(mask_generator(rng).reshape(-1))
        return batch_feature(outputs, return_tensors)


def _central_square(image, size: int, resample):
    """The central square (side = shorter side) resampled to `size`: "resize shorter side, center-crop" with one
    resampling."""
    return RandomResizedCrop.resized_crop(image, center_square_box(*image.size), (size, size), resample)


def _checked_views(views, sizes: dict[str, int]) -> Sequence[Any]:
    """The augmentation's two views, checked against the sizes the mask grid and the models expect."""
    if not isinstance(views, (tuple, list)) or len(views) != 2:
        raise ValueError(
            "The augmentation must return two views (backbone, tokenizer), as TwoViewAugmentation does; got "
            f"{type(views).__name__}"
        )
    for view, (name, size) in zip(views, sizes.items(), strict=True):
        check_view_size(view, size, f"{name} view", f"{name} size")
    return views


def _build_mask_generator(
    image_size: int,
    patch_size: int,
    mask_type: str,
    mask_ratio: float,
    num_masking_patches: int | None,
    min_num_patches: int,
    max_num_patches: int | None,
    min_aspect: float,
    max_aspect: float | None,
) -> BlockwiseMaskGenerator | RandomMaskGenerator:
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if mask_type not in _MASK_TYPES:
        raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
    grid = (image_size // patch_size,) * 2
    if mask_type == "blockwise":
        return BlockwiseMaskGenerator(
            grid, mask_ratio, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect
        )
    return RandomMaskGenerator(grid, mask_ratio, num_masking_patches)
