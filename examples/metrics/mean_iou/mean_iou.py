"""Mean intersection-over-union for semantic segmentation as a local `evaluate` module (loads offline)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Per-class intersection over union, accumulated over the whole evaluation set (not averaged per image), then
averaged over the classes that occur in the references or the predictions (classes absent from both are NaN and
left out of the mean, as mmsegmentation does). Pixels whose reference equals `ignore_index` are not counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D `int` arrays): predicted class per pixel, each (height, width).
    references (`list` of 2-D `int` arrays): true class per pixel, same shapes as the predictions.
    num_labels (`int`): number of classes.
    ignore_index (`int`, defaults to 255): reference value of pixels to leave out.
Returns:
    `mean_iou`, `mean_accuracy` (mean per-class recall), `overall_accuracy` (pixel accuracy), and the per-class
    arrays `per_category_iou`, `per_category_accuracy` (NaN for classes that never occur).
Examples:
    >>> mean_iou = evaluate.load("examples/metrics/mean_iou")
    >>> mean_iou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2)["mean_iou"]
    0.5
"""


def intersection_and_union(
    prediction: np.ndarray, reference: np.ndarray, num_labels: int, ignore_index: int
) -> tuple[np.ndarray, ...]:
    """Per-class pixel counts (intersection, union, prediction area, reference area) of one image, each (num_labels,)."""
    valid = reference != ignore_index
    prediction, reference = prediction[valid], reference[valid]
    out_of_range = reference[(reference < 0) | (reference >= num_labels)]
    if out_of_range.size:
        raise ValueError(
            f"references contain class ids outside [0, {num_labels}) that are not ignore_index={ignore_index}: "
            f"{sorted(set(out_of_range.tolist()))[:10]}"
        )
    intersection = np.bincount(prediction[prediction == reference], minlength=num_labels)[:num_labels]
    area_prediction = np.bincount(prediction[(prediction >= 0) & (prediction < num_labels)], minlength=num_labels)
    area_reference = np.bincount(reference, minlength=num_labels)
    union = area_prediction + area_reference - intersection
    return intersection, union, area_prediction, area_reference


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255):
        totals = np.zeros((4, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            prediction, reference = np.asarray(prediction, dtype=np.int64), np.asarray(reference, dtype=np.int64)
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"prediction shape {prediction.shape} differs from reference shape {reference.shape}."
                )
            totals += np.stack(intersection_and_union(prediction, reference, num_labels, ignore_index))
        intersection, union, _, area_reference = totals.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_category_iou = intersection / union
            per_category_accuracy = intersection / area_reference
        return {
            "mean_iou": float(np.nanmean(per_category_iou)),
            "mean_accuracy": float(np.nanmean(per_category_accuracy)),
            "overall_accuracy": float(intersection.sum() / max(area_reference.sum(), 1.0)),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
