"""Classification accuracy as a local `evaluate` module (loads offline with `evaluate.load(path)`).

It has the contract of the Hub's `accuracy` metric (`evaluate.load("accuracy")`): predicted class ids, not scores,
with the same `normalize` and `sample_weight` options and the same result, so either can replace the other. For
top-k accuracy from scores, see `top_k_accuracy`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of examples whose predicted class id equals the true class id:
(number of correct predictions) / (number of examples).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (e.g. the argmax of the logits), shape (num_examples,).
    references (`list` of `int`): true class ids, shape (num_examples,).
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; `False`: their number
        (their summed weight, with `sample_weight`).
    sample_weight (`list` of `float`, *optional*): a weight per example.
Returns:
    `accuracy` (`float`): in [0, 1] with `normalize=True`.
Examples:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 2])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # Integer features, as on the Hub: scores (a list of floats per example) are rejected when added.
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions, dtype=np.int64) == np.asarray(references, dtype=np.int64)).astype(
            np.float64
        )
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight must have one weight per example {correct.shape}, got {weights.shape}.")
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
