"""Top-k classification accuracy from scores, as a local `evaluate` module (loads offline with `evaluate.load(path)`).

Unlike `accuracy` (the Hub's contract: predicted class ids), this metric needs the scores of every class, since the
true class only has to be among the `k` best.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of examples whose true class is among the `k` highest-scoring classes, for each requested `k`.
Predictions are the raw scores (logits or probabilities), shape (num_examples, num_classes); references are the
integer class ids, shape (num_examples,). Ties are broken by class order, as `numpy.argsort` does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): scores, shape (num_examples, num_classes).
    references (`list` of `int`): true class ids, shape (num_examples,).
    top_k (`list` of `int`, defaults to `[5]`): the values of k to report.
Returns:
    `top{k}_accuracy` for every k, each a float in [0, 1] (`top1_accuracy` is the usual accuracy).
Examples:
    >>> top_k_accuracy = evaluate.load("examples/metrics/top_k_accuracy")
    >>> top_k_accuracy.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[2, 0], top_k=[1, 2])
    {'top1_accuracy': 0.5, 'top2_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(5,)):
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must have shape (num_examples, num_classes) matching references {labels.shape}, "
                f"got {scores.shape}."
            )
        num_classes = scores.shape[1]
        invalid = [k for k in top_k if not 1 <= k <= num_classes]
        if invalid:
            raise ValueError(f"top_k values must lie in [1, num_classes={num_classes}], got {invalid}.")
        # Stable descending order so ties go to the lower class id, as argmax does for k = 1.
        ranking = np.argsort(-scores, axis=1, kind="stable")
        hits = ranking == labels[:, None]
        return {f"top{k}_accuracy": float(hits[:, :k].any(axis=1).mean()) for k in top_k}
