"""Image processor for masked image modeling with BEiT v2 (and BEiT v1): two views of one crop plus a patch mask."""

from __future__ import annotations

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .augmentation import TwoViewAugmentation
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .processor_settings import (
    check_augmentation_overrides,
    check_call_settings,
    check_view_size,
    drop_removed_seed,
    resolve_rng,
)
from .transforms import (
    RandomResizedCrop,
    center_square_box,
    make_image_list,
    resample_filter,
    to_float_array,
    to_pil_image,
)

logger = logging.get_logger(__name__)

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
# A setting of earlier versions: the tokenizer view is now plain [0, 1] and each tokenizer maps it itself.
_REMOVED_TOKENIZER_PIXEL_MAPPING = "tokenizer_pixel_mapping"
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
# The settings `preprocess` reads (evaluation views, normalisation, mask); each can be overridden for one call.
_PREPROCESS_SETTINGS = (
    "interpolation",
    "image_mean",
    "image_std",
    "tokenizer_image_size",
    "tokenizer_interpolation",
    *_MASK_SETTINGS,
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


class BeitV2ImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for masked image modeling: a backbone view, a tokenizer view of the same crop, and a patch mask.

    - Evaluation (default): the central square (side = shorter side) resized to `image_size` (backbone) and to
      `tokenizer_image_size` (tokenizer), i.e. "resize shorter side, center-crop" with one resampling per view.
    - Training: `processor(images, augmentation=processor.training_augmentation(), rng=generator)`, where
      `training_augmentation()` is the reference recipe built from this processor's settings (a
      `TwoViewAugmentation`): ColorJitter(`color_jitter` for brightness, contrast and saturation; no hue), horizontal
      flip (p = 0.5), then ONE random resized crop box (`crop_scale`, `crop_ratio`) resampled to both views.

    The processor holds no random state: the mask (and the augmentation) draw from the `rng` of the call, and a call
    without one uses a fixed seed, so the same call gives the same output. For training, give each call (or each
    example) its own generator, e.g. one per example derived from the run seed and the example's position.

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

    Settings can be changed afterwards (`processor.mask_ratio = 0.5`) or, for the settings `preprocess` reads, for
    one call (`processor(images, mask_ratio=0.5)`), as with transformers' processors. The training-only settings
    (`crop_scale`, `crop_ratio`, `color_jitter`) are overridden in `training_augmentation(crop_scale=...)`.

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
        **kwargs,
    ):
        if _REMOVED_TOKENIZER_PIXEL_MAPPING in kwargs:
            # Saved configs of earlier versions hold it; the tokenizers now own their input mapping.
            logger.warning(
                f"`{_REMOVED_TOKENIZER_PIXEL_MAPPING}` is deprecated and ignored: `tokenizer_pixel_values` are plain "
                "[0, 1] pixels, which VQKDModel and DVAEModel map to their own input range."
            )
            kwargs.pop(_REMOVED_TOKENIZER_PIXEL_MAPPING)
        drop_removed_seed(kwargs)
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
        # Bad settings fail here rather than at the first image.
        _build_mask_generator(**{name: getattr(self, name) for name in _MASK_SETTINGS})
        self.training_augmentation()

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
        """The mask generator of the current masking settings (`preprocess` draws from it with the call's `rng`)."""
        return _build_mask_generator(**{name: getattr(self, name) for name in _MASK_SETTINGS})

    @property
    def num_patches(self) -> int:
        return self.mask_generator.num_patches

    def training_augmentation(self, **overrides) -> TwoViewAugmentation:
        """
        The pretraining augmentation of this processor's current settings, as a `TwoViewAugmentation` to pass to
        `preprocess(images, augmentation=..., rng=...)`.

        Args:
            overrides: Any of `image_size`, `tokenizer_image_size`, `crop_scale`, `crop_ratio`, `interpolation`,
                `tokenizer_interpolation`, `color_jitter`, for this augmentation only.
        """
        check_augmentation_overrides(overrides, _AUGMENTATION_SETTINGS)
        return TwoViewAugmentation(
            **{name: overrides.get(name, getattr(self, name)) for name in _AUGMENTATION_SETTINGS}
        )

    def preprocess(
        self,
        images,
        augmentation: TwoViewAugmentation | None = None,
        rng: np.random.Generator | int | None = None,
        return_tensors: str | None = None,
        **settings,
    ) -> BatchFeature:
        """
        Args:
            images: One image or a list/batch of images (PIL, numpy, torch; any PIL mode; any size).
            augmentation (`Callable[[PIL.Image.Image, numpy.random.Generator], tuple[PIL.Image.Image,
                PIL.Image.Image]]`, *optional*): Produces the backbone and tokenizer views of each image, e.g.
                `self.training_augmentation()`; by default the deterministic evaluation views.
            rng (`numpy.random.Generator` or `int`, *optional*): Generator of the augmentation and the masks (or its
                seed), drawn from image after image; by default a generator with a fixed seed, so that the same call
                gives the same output.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any of the settings `preprocess` reads (e.g. `mask_ratio=0.5`), for this call only: the
                view sizes and filters, `image_mean`, `image_std`, `patch_size` and the masking settings.
        """
        check_call_settings(settings, _PREPROCESS_SETTINGS, _AUGMENTATION_SETTINGS, type(self).__name__)
        current = {name: settings.get(name, getattr(self, name)) for name in _PREPROCESS_SETTINGS}
        mask_generator = _build_mask_generator(**{name: current[name] for name in _MASK_SETTINGS})
        mean = np.asarray(current["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(current["image_std"], dtype=np.float32)[:, None, None]
        sizes = {"backbone": int(current["image_size"]), "tokenizer": int(current["tokenizer_image_size"])}
        resample = {
            "backbone": resample_filter(current["interpolation"]),
            "tokenizer": resample_filter(current["tokenizer_interpolation"]),
        }
        rng = resolve_rng(rng)
        outputs = {name: [] for name in self.model_input_names}
        for raw in make_image_list(images):
            image = to_pil_image(raw)
            if augmentation is None:
                box = center_square_box(*image.size)
                views = [RandomResizedCrop.resized_crop(image, box, (sizes[v],) * 2, resample[v]) for v in sizes]
            else:
                views = _checked_views(augmentation(image, rng), sizes)
            outputs["pixel_values"].append((to_float_array(views[0]) - mean) / std)
            outputs["tokenizer_pixel_values"].append(to_float_array(views[1]))
            outputs["bool_masked_pos"].append(mask_generator(rng).reshape(-1))
        if return_tensors is not None:
            outputs = {name: np.stack(values) for name, values in outputs.items()}
        return BatchFeature(data=outputs, tensor_type=return_tensors)


def _checked_views(views, sizes: dict[str, int]) -> tuple:
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
