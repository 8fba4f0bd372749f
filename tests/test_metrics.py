"""kdlib.metrics against sklearn/scipy on random and degenerate inputs."""

from __future__ import annotations

import ast
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from kdlib import metrics
from kdlib.metrics import (CLASSIFICATION_METRICS, REGRESSION_METRICS, accuracy, default_primary_metric, f1,
                           matthews, pearson, spearman, task_metrics)


def _quiet(fn, *args, **kw):
    # sklearn/scipy warn on the degenerate cases that are the point of some tests.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_classification_matches_sklearn(seed, classes):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, classes, n)
    # Correlated with the labels so scores are not all near zero.
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, classes, n))
    assert accuracy(preds, labels) == pytest.approx(100 * sk.accuracy_score(labels, preds))
    average = "binary" if classes == 2 else "macro"
    assert f1(preds, labels, num_classes=classes) == pytest.approx(
        100 * _quiet(sk.f1_score, labels, preds, average=average))
    assert matthews(preds, labels) == pytest.approx(100 * _quiet(sk.matthews_corrcoef, labels, preds))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 300))
    y = rng.normal(size=n)
    x = 0.5 * y + rng.normal(size=n)
    assert pearson(x, y) == pytest.approx(100 * stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(100 * stats.spearmanr(x, y)[0])


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 5, 200).astype(float)  # many ties on both sides
    y = np.round(x + rng.normal(size=200))
    assert spearman(x, y) == pytest.approx(100 * stats.spearmanr(x, y)[0])


def test_average_ranks_match_scipy():
    a = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(metrics._average_ranks(a), stats.rankdata(a))


def test_results_are_plain_floats_in_points():
    labels = np.array([0, 1, 1, 0])
    for value in (accuracy(labels, labels), f1(labels, labels), matthews(labels, labels),
                  pearson(labels, labels), spearman(labels, labels)):
        assert type(value) is float and value == pytest.approx(100.0)


def test_constant_predictions_score_zero_not_nan():
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.ones(5, dtype=int)
    assert matthews(constant, labels) == 0.0
    assert _quiet(sk.matthews_corrcoef, labels, constant) == 0.0
    x = np.full(5, 0.1)  # a mean that is not exact in floating point must still count as constant
    y = np.array([1.0, 2.0, 0.5, 3.0, 2.5])
    assert pearson(x, y) == 0.0 and spearman(x, y) == 0.0
    assert pearson(y, x) == 0.0 and spearman(y, x) == 0.0
    assert np.isnan(_quiet(stats.pearsonr, x, y)[0])  # what the reference would give


def test_f1_binary_without_positives_is_zero():
    zeros = np.zeros(4, dtype=int)
    assert f1(zeros, zeros) == 0.0 == 100 * _quiet(sk.f1_score, zeros, zeros)


def test_f1_binary_is_for_class_one():
    labels = np.array([1, 1, 0, 0, 0, 0])
    preds = np.array([1, 0, 0, 0, 0, 1])
    # class 1: tp=1, fp=1, fn=1 -> 0.5; class 0 would give 0.75
    assert f1(preds, labels) == pytest.approx(50.0)
    assert f1(preds, labels, num_classes=2) == pytest.approx(50.0)


def test_f1_macro_over_classes_present():
    labels = np.array([0, 1, 2, 2])
    preds = np.array([0, 2, 2, 1])
    assert f1(preds, labels, num_classes=4) == pytest.approx(100 * sk.f1_score(labels, preds, average="macro"))
    # Without num_classes, ids beyond 0/1 make it macro.
    assert f1(preds, labels) == pytest.approx(100 * sk.f1_score(labels, preds, average="macro"))


def test_task_metrics_classification_takes_argmax():
    logits = np.array([[2.0, 1.0], [0.1, 0.9], [0.3, 0.2], [0.0, 5.0]])
    labels = np.array([0, 1, 1, 1])
    scores = task_metrics("classification", logits, labels)
    assert tuple(scores) == CLASSIFICATION_METRICS
    preds = np.array([0, 1, 0, 1])
    assert scores == pytest.approx({"accuracy": 75.0, "f1": 100 * sk.f1_score(labels, preds),
                                    "matthews": 100 * sk.matthews_corrcoef(labels, preds)})


def test_task_metrics_three_classes_use_macro_f1():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(60, 3))
    labels = rng.integers(0, 3, 60)
    preds = logits.argmax(1)
    assert task_metrics("classification", logits, labels)["f1"] == pytest.approx(
        100 * sk.f1_score(labels, preds, average="macro"))


@pytest.mark.parametrize("shape", [(20,), (20, 1)])
def test_task_metrics_regression(shape):
    rng = np.random.default_rng(4)
    labels = rng.uniform(0, 5, 20)
    outputs = (labels + rng.normal(size=20)).reshape(shape)
    scores = task_metrics("regression", outputs, labels)
    assert tuple(scores) == REGRESSION_METRICS
    assert scores["pearson"] == pytest.approx(100 * stats.pearsonr(outputs.ravel(), labels)[0])
    assert scores["spearman"] == pytest.approx(100 * stats.spearmanr(outputs.ravel(), labels)[0])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="zero examples"):
        pearson(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        pearson(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="NaN"):  # checked before ranking, which would give NaN a rank
        spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.inf, 2.0]))
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        task_metrics("classification", np.array([0.1, 0.9]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        task_metrics("regression", np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="unlabeled"):
        task_metrics("classification", np.zeros((2, 2)), np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="unknown task kind"):
        task_metrics("ranking", np.zeros((2, 2)), np.zeros(2))


def test_default_primary_metric():
    assert default_primary_metric("classification") == "accuracy"
    assert default_primary_metric("regression") == "pearson"
    with pytest.raises(ValueError, match="unknown task kind"):
        default_primary_metric("ranking")


def test_metrics_module_imports_numpy_only():
    tree = ast.parse(open(metrics.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "numpy"}
