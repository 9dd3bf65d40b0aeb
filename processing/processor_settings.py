"""What the two image processors share: reading the images of a call, per-call settings, normalisation, the
generator of a call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
from transformers.feature_extraction_utils import BatchFeature

from .transforms import make_image_list, to_channel_images, to_float_array, to_pil_image


def read_images(
    images, do_convert_rgb: bool, input_data_format: str | None
) -> list[PIL.Image.Image | list[PIL.Image.Image]]:
    """
    The images of a call (one image, a list, or a 4-D array/tensor), each as an RGB PIL image (`do_convert_rgb`) or
    as the list of its channels, one single-channel PIL image each (`processing.transforms.to_channel_images`), so
    that the same PIL resampling serves any number of channels. `input_data_format` says where the channel axis of
    array inputs is ("channels_first" / "channels_last"); by default it is inferred.
    """
    read = to_pil_image if do_convert_rgb else to_channel_images
    return [read(image, input_data_format) for image in make_image_list(images)]


def apply_view(view, image: PIL.Image.Image | list[PIL.Image.Image]) -> PIL.Image.Image | list[PIL.Image.Image]:
    """`view` (a deterministic PIL transform) applied to an RGB image or to each channel of `read_images`'s list.
    PIL resamples every channel of an RGB image exactly as it resamples it alone, so the two agree."""
    return view(image) if isinstance(image, PIL.Image.Image) else [view(channel) for channel in image]


def num_channels(image: PIL.Image.Image | list[PIL.Image.Image]) -> int:
    return len(image.getbands()) if isinstance(image, PIL.Image.Image) else len(image)


def normalisation(
    image_mean: float | Sequence[float], image_std: float | Sequence[float], channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """`image_mean` and `image_std` as float32 `(channels, 1, 1)` arrays, checked against the images' channels (a
    single float applies to every channel, as in transformers)."""
    arrays = []
    for name, given in (("image_mean", image_mean), ("image_std", image_std)):
        values = np.atleast_1d(np.asarray(given, dtype=np.float32))
        if values.ndim != 1 or len(values) not in (1, channels):
            raise ValueError(
                f"{name} has {values.size} values but the images have {channels} channels (with "
                "do_convert_rgb=False the images keep their own channels): give one value per channel."
            )
        arrays.append(np.broadcast_to(values, (channels,)).reshape(channels, 1, 1))
    if (arrays[1] == 0).any():
        raise ValueError(f"image_std must not be 0, got {image_std}")
    return arrays[0], arrays[1]


def normalised_batch(
    images,
    view: Callable[[PIL.Image.Image], PIL.Image.Image],
    image_mean: Sequence[float],
    image_std: Sequence[float],
    do_convert_rgb: bool,
    input_data_format: str | None,
    return_tensors: str | None,
) -> BatchFeature:
    """`{"pixel_values": ...}` of each image's `view` (applied per channel plane), normalised: the evaluation call
    both processors share, and VQ-KD's pretraining inputs. `return_tensors=None` gives a list per image, else a
    stacked batch."""
    pixel_values: list[np.ndarray] = []
    for image in read_images(images, do_convert_rgb, input_data_format):
        mean, std = normalisation(image_mean, image_std, num_channels(image))
        pixel_values.append((to_float_array(apply_view(view, image)) - mean) / std)
    return batch_feature({"pixel_values": pixel_values}, return_tensors)


def batch_feature(outputs: dict[str, list[np.ndarray]], return_tensors: str | None) -> BatchFeature:
    """The per-image `outputs` of a call: lists (one entry per image) with `return_tensors=None`, else each stacked
    along a batch axis, as "np" or "pt"."""
    data: dict[str, list[np.ndarray]] | dict[str, np.ndarray] = outputs
    if return_tensors is not None:
        data = {name: np.stack(values) for name, values in outputs.items()}
    return BatchFeature(data=data, tensor_type=return_tensors)


class SettingsMixin:
    """
    What both image processors' calls share: the per-call settings over the processor's own, and `preprocess`, the
    evaluation view. A processor (mixed in before `BaseImageProcessor`) names its evaluation settings in
    `_evaluation_settings`, where misplaced arguments of `preprocess` go in `_preprocess_elsewhere` (see
    `check_settings`), and builds its evaluation view in `_evaluation_transform`.
    """

    # The settings `preprocess` takes for one call: the evaluation view's and the normalisation's.
    _evaluation_settings: ClassVar[tuple[str, ...]]
    # The names of other methods' arguments, each mapped to where it goes, for `preprocess`'s error message.
    _preprocess_elsewhere: ClassVar[Mapping[str, str]]
    do_convert_rgb: bool

    def _evaluation_transform(self, current: Mapping[str, Any]) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
        """The deterministic evaluation view of the `current` settings (those of `_evaluation_settings`)."""
        raise NotImplementedError

    def _call_settings(
        self, method: str, settings: Mapping[str, Any], accepted: tuple[str, ...], elsewhere: Mapping[str, str]
    ) -> dict[str, Any]:
        """The `accepted` settings of one call of `method`: those given in `settings`, else the processor's own.
        Raises a ValueError naming every other setting (see `check_settings`)."""
        check_settings(settings, accepted, f"{type(self).__name__}.{method}", elsewhere)
        return {name: settings.get(name, getattr(self, name)) for name in accepted}

    def preprocess(
        self,
        images,
        do_convert_rgb: bool | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = None,
        **settings,
    ) -> BatchFeature:
        """
        The evaluation view of each image: `pixel_values` only (what pipelines and inference read).

        Args:
            images: One image or a list/batch of images (PIL, numpy, torch; any PIL mode; any size).
            do_convert_rgb (`bool`, *optional*): Overrides `self.do_convert_rgb` for this call.
            input_data_format (`str` or `ChannelDimension`, *optional*): "channels_first" or "channels_last" for
                array inputs; inferred by default.
            return_tensors (`str`, *optional*): "np" or "pt" to stack the batch; `None` returns a list per image.
            settings: Any of the evaluation view's settings (the class docstring lists them), for this call only.
        """
        current = self._call_settings("preprocess", settings, self._evaluation_settings, self._preprocess_elsewhere)
        return normalised_batch(
            images,
            self._evaluation_transform(current),
            current["image_mean"],
            current["image_std"],
            self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb,
            input_data_format,
            return_tensors,
        )


def check_view_size(view: PIL.Image.Image, size: int, view_name: str, setting_name: str) -> None:
    """Raises a ValueError when an augmentation's `view` is not the `size` x `size` square the processor's
    `setting_name` asks for (an augmentation built before the processor's sizes changed)."""
    if view.size != (size, size):
        raise ValueError(
            f"The augmentation's {view_name} is {view.size[0]}x{view.size[1]}, but the processor's {setting_name} is "
            f"{size}: build the augmentation with processor.training_augmentation() after changing sizes."
        )


def check_settings(
    settings: Mapping[str, Any], accepted: Iterable[str], method: str, elsewhere: Mapping[str, str]
) -> None:
    """Raises a ValueError naming every per-call setting that `method` does not read.

    `elsewhere` maps the names of arguments that belong to another method (the training augmentation, the
    pretraining inputs) to where they go, so that the message says so instead of listing them as unknown.
    """
    accepted = tuple(accepted)
    misplaced = sorted(name for name in settings if name in elsewhere and name not in accepted)
    if misplaced:
        raise ValueError(f"{method} does not take {misplaced}: {elsewhere[misplaced[0]]}")
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for {method}; accepted: {list(accepted)}")


def check_augmentation_overrides(overrides: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Raises a ValueError naming every override `training_augmentation` does not read."""
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown augmentation setting(s) {unknown}; accepted: {list(accepted)}")


def resolve_rng(rng: np.random.Generator | int) -> np.random.Generator:
    """The generator of one call: `rng` itself, or a new one seeded with an int."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}: {rng!r}")
