"""transformers' own `ImageProcessingTestMixin` on the image processors that `processing/` ships.

The mixin comes from the test modules of the installed transformers version (its source distribution;
`tests/fetch_transformers_tests.py`, run by `make test`, puts them in `build/transformers-tests/`). It is what
transformers runs on its own BEiT image processor: where it passes, our processors behave like transformers' own
wherever the ecosystem calls them (save/load, `AutoImageProcessor`, `from_dict` with kwargs, JSON, calls on PIL /
numpy / torch images, batched and not, channels first or last, 4-channel input without RGB conversion,
`return_tensors`, casting the output).

The testers follow transformers' `BeitImageProcessingTester`: 7 random images of 30 to 400 px, an 18 px output
normalised with mean = std = 0.5. Both processors are PIL-backend `BaseImageProcessor`s, so each tester names its
class as the "pil" backend instead of inferring the classes from this file's folder name.
"""

from __future__ import annotations

import unittest

from conftest import import_transformers_tests

from processing import BeitV2ImageProcessor, VQKDImageProcessor

(image_processing_common,) = import_transformers_tests("test_image_processing_common")
ImageProcessingTester = image_processing_common.ImageProcessingTester
ImageProcessingTestMixin = image_processing_common.ImageProcessingTestMixin


# transformers requires a torchvision backend of every processor added to its own library after 2025-09 (the test
# looks for this file's folder name in its list of older models); ours are PIL-only by design.
_NO_TORCHVISION = "PIL-only by design: the reference transforms resample with PIL, torchvision is not a dependency"


class _SquareOutputTester(ImageProcessingTester):
    """Shared by both testers: one "pil" backend class, and square `(C, image_size, image_size)` outputs."""

    processor_class: type

    def _get_image_processing_classes(self) -> dict[str, type]:
        return {"pil": self.processor_class}

    def expected_output_image_shape(self, images) -> tuple[int, int, int]:
        return self.num_channels, self.image_size, self.image_size


class _OurProcessorTest:
    """Shared by both test classes (listed before the mixin, so these settings win): dtype casting is tested, and
    the torchvision-backend requirement is skipped. Each test class sets only its tester class."""

    test_cast_dtype = True

    @unittest.skip(reason=_NO_TORCHVISION)
    def test_new_models_require_torchvision_backend(self):
        pass


class BeitV2ImageProcessingTester(_SquareOutputTester):
    """BEiT's tester sizes (18 px output); 6 px patches give the mask generator a 3x3 grid."""

    processor_class = BeitV2ImageProcessor

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("image_size", 18)
        kwargs.setdefault("patch_size", 6)
        kwargs.setdefault("tokenizer_image_size", 12)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(parent, **kwargs)


class BeitV2ImageProcessingTest(_OurProcessorTest, ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = BeitV2ImageProcessingTester


class VQKDImageProcessingTester(_SquareOutputTester):
    """BEiT's tester sizes: the shorter side resized to 20 (`crop_pct` 0.9), then the central 18 px square."""

    processor_class = VQKDImageProcessor

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("image_size", 18)
        kwargs.setdefault("crop_pct", 0.9)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(parent, **kwargs)


class VQKDImageProcessingTest(_OurProcessorTest, ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = VQKDImageProcessingTester
