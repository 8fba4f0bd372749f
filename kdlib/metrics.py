"""GLUE-style task metrics in points (×100), with numpy only.

Degenerate inputs (constant predictions, a single class) score 0.0 instead of NaN, so a
collapsed model reads as "no better than chance" in tables and sweeps rather than as a
missing value.
"""

from __future__ import annotations

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the label.

    Args:
        preds: Predicted class ids, shape (N,).
        labels: True class ids, shape (N,).

    Returns:
        Accuracy in points (0-100).
    """
    preds, labels = _pair(preds, labels)
    return float(np.mean(preds == labels) * 100.0)


def f1(preds: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """F1 score: of class 1 for binary tasks, unweighted mean over classes otherwise.

    Matches ``sklearn.metrics.f1_score`` with ``average="binary"`` (2 classes) or
    ``average="macro"`` (the mean over classes that occur in ``preds`` or ``labels``).

    Args:
        preds: Predicted class ids, shape (N,).
        labels: True class ids, shape (N,).
        num_classes: The task's number of classes; binary F1 when it is 2. When None,
            binary if every id is 0 or 1.

    Returns:
        F1 in points (0-100); 0.0 when there is no positive at all in the binary case.
    """
    preds, labels = _pair(preds, labels)
    classes = np.union1d(preds, labels)
    binary = num_classes == 2 if num_classes is not None else bool(np.isin(classes, (0, 1)).all())
    if binary:
        classes = np.array([1])
    # F1 = 2tp / (2tp + fp + fn), the harmonic mean of precision and recall written so
    # that it stays defined (as 0) when the class is never predicted.
    tp = np.array([np.sum((preds == c) & (labels == c)) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(preds == c) for c in classes], dtype=np.float64)
    actual = np.array([np.sum(labels == c) for c in classes], dtype=np.float64)
    denominator = predicted + actual
    scores = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(np.mean(scores) * 100.0)


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multiclass form, as sklearn computes it).

    Args:
        preds: Predicted class ids, shape (N,).
        labels: True class ids, shape (N,).

    Returns:
        MCC in points (-100 to 100); 0.0 when only one class is predicted or present.
    """
    preds, labels = _pair(preds, labels)
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    n = len(labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (encoded[:n], encoded[n:]), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    covariance = correct * total - true_counts @ pred_counts
    variance = (total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts)
    if variance == 0:
        return 0.0
    return float(covariance / np.sqrt(variance) * 100.0)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation.

    Args:
        x: Predictions, shape (N,).
        y: Targets, shape (N,).

    Returns:
        Correlation in points (-100 to 100); 0.0 when either side is constant.
    """
    return _correlation(*_finite_pair(x, y))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: `pearson` of the ranks (ties get their average rank, as in scipy).

    Same arguments and range as `pearson`.
    """
    return _correlation(*map(_average_ranks, _finite_pair(x, y)))


def task_metrics(kind: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of a task kind.

    Args:
        kind: ``classification`` or ``regression``.
        outputs: Classification: logits or probabilities, shape (N, C); the argmax is
            the prediction. Regression: predictions, shape (N,) or (N, 1).
        labels: Class ids (classification) or targets (regression), shape (N,).

    Returns:
        ``{metric name: points}`` for every name in ``CLASSIFICATION_METRICS`` or
        ``REGRESSION_METRICS``.
    """
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if kind == "classification":
        if outputs.ndim != 2:
            raise ValueError(f"classification outputs must have shape (N, classes), got {outputs.shape}")
        if labels.dtype.kind == "f" and np.isnan(labels).any():
            raise ValueError("labels contain NaN (unlabeled examples cannot be scored)")
        preds = outputs.argmax(axis=1)
        return {"accuracy": accuracy(preds, labels),
                "f1": f1(preds, labels, num_classes=outputs.shape[1]),
                "matthews": matthews(preds, labels)}
    if kind == "regression":
        if outputs.ndim == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        if outputs.ndim != 1:
            raise ValueError(f"regression outputs must have shape (N,) or (N, 1), got {outputs.shape}")
        return {"pearson": pearson(outputs, labels), "spearman": spearman(outputs, labels)}
    raise ValueError(f"unknown task kind {kind!r}; expected 'classification' or 'regression'")


def default_primary_metric(kind: str) -> str:
    """The metric a task of this kind is ranked by: accuracy or Pearson.

    Args:
        kind: ``classification`` or ``regression``.

    Returns:
        ``"accuracy"`` or ``"pearson"``.
    """
    if kind == "classification":
        return "accuracy"
    if kind == "regression":
        return "pearson"
    raise ValueError(f"unknown task kind {kind!r}; expected 'classification' or 'regression'")


def _pair(a: np.ndarray, b: np.ndarray, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of one length, at least one element."""
    a, b = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
        raise ValueError(f"expected two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("cannot score zero examples")
    return a, b


def _finite_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 `_pair`s, every value finite."""
    x, y = _pair(x, y, dtype=np.float64)
    # A diverged model's NaN predictions must fail loudly, not turn into a correlation (checked before
    # ranking, which would give NaN a rank like any other value).
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("predictions or targets contain NaN or infinity")
    return x, y


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    # Tested on the values, not on the variance: the mean of a constant array can be off
    # in the last bit, which would leave a tiny variance and an arbitrary correlation.
    if x.min() == x.max() or y.min() == y.max():
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    # Rounding can push |r| a hair past 1.
    return float(np.clip(dx @ dy / denominator, -1.0, 1.0) * 100.0)


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    group = np.cumsum(np.r_[True, sorted_a[1:] != sorted_a[:-1]]) - 1
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = group_rank[group]
    return ranks
