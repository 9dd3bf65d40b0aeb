"""
Data processing for BEiT v2 / BEiT: mask generators, augmentation (PIL + numpy), image processors, collators.

Training augmentations (`augmentation.py`) are callables `augmentation(image, rng)` that draw from an explicit numpy
generator. The image processors hold each setting once and no random state: `processor(images)` returns the
deterministic evaluation view only (what pipelines and inference read), and
`processor.pretraining_inputs(images, rng=..., augmentation=processor.training_augmentation())` the pretraining
inputs (for BEiT v2: both views and the mask), drawn from the call's generator.

Importing this package registers `VQKDImageProcessor` and `BeitV2ImageProcessor` with `AutoImageProcessor` (so a
saved processor folder loads with `AutoImageProcessor.from_pretrained(folder)`), and marks them for custom-code
export (so `save_pretrained` also writes `auto_map` and copies this package's processor files, which lets
`AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)` load them where this package is not installed).
"""

from transformers import AutoImageProcessor

from .augmentation import (
    ClassificationAugmentation,
    SegmentationAugmentation,
    SingleViewAugmentation,
    TwoViewAugmentation,
)
from .collators import DataCollatorForMaskedImageModeling, MixupCutmixCollator
from .image_processing_beitv2 import BeitV2ImageProcessor
from .image_processing_vqkd import VQKDImageProcessor
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .rand_augment import RandAugment
from .random_state import ProcessLocalRNG
from .transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    TwoViewRandomResizedCrop,
    convert_to_rgb,
    to_pil_image,
)

# transformers 5 accepts a model-type string as the registration key; a saved processor is then found by the class
# name in its `image_processor_type`, without importing `modeling_beitv2`.
for _model_type, _processor_class in (("vqkd", VQKDImageProcessor), ("beitv2", BeitV2ImageProcessor)):
    AutoImageProcessor.register(_model_type, image_processor_classes={"pil": _processor_class}, exist_ok=True)
    _processor_class.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "BeitV2ImageProcessor",
    "BlockwiseMaskGenerator",
    "CenterCrop",
    "ClassificationAugmentation",
    "ColorJitter",
    "Compose",
    "DataCollatorForMaskedImageModeling",
    "MixupCutmixCollator",
    "ProcessLocalRNG",
    "RandAugment",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomMaskGenerator",
    "RandomResizedCrop",
    "Resize",
    "SegmentationAugmentation",
    "SingleViewAugmentation",
    "TwoViewAugmentation",
    "TwoViewRandomResizedCrop",
    "VQKDImageProcessor",
    "convert_to_rgb",
    "to_pil_image",
]
