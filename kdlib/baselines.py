"""Sanity baselines: what a task's dev set scores without learning anything, and the teachers that do no better.

- classification: the majority class, the most frequent training label (the lowest class id on a tie),
  predicted for every dev example and scored with the task's metric: accuracy is that class's share of
  dev, F1 is 0 unless the majority is the positive class, Matthews correlation 0.
- regression: the training mean predicted for every dev example. A correlation (Pearson, Spearman) of a
  constant is undefined; kdlib.metrics scores it 0.0, and so does the baseline (never NaN).

A teacher ensemble "within MARGIN points" of its baseline (or below it) has learned nothing usable, and a
student distilled from it cannot learn the task either: for a correlation metric that is an ensemble
score of at most 2 points (r <= 0.02).
"""

from __future__ import annotations

import numpy as np

from kdlib.metrics import task_metrics

MARGIN = 2.0  # points: an ensemble scoring at most baseline + MARGIN is at chance level


def task_baseline(*, kind: str, metric: str, train_labels, dev_labels, num_classes: int = 1) -> dict:
    """The no-learning predictor of a task and its dev score.

    Args:
        train_labels: the training split's class ids or targets (the predictor is fit on them).
        dev_labels: the dev split's, which it is scored on.
        num_classes: classification: the number of classes (the width of the predictor's outputs).
    Returns:
        {"predictor": "majority" | "mean", "prediction": class id or the mean target, "score": points}.
    """
    train, dev = np.asarray(train_labels), np.asarray(dev_labels)
    if len(train) == 0:
        raise ValueError("a baseline needs training labels; the training split is empty")
    if kind == "classification":
        majority = int(np.bincount(train.astype(np.int64), minlength=num_classes).argmax())
        outputs = np.zeros((len(dev), num_classes))
        outputs[:, majority] = 1.0
        return {"predictor": "majority", "prediction": majority,
                "score": task_metrics(kind, outputs, dev)[metric]}
    mean = float(train.astype(np.float64).mean())
    return {"predictor": "mean", "prediction": mean,
            "score": task_metrics(kind, np.full(len(dev), mean), dev)[metric]}


def at_chance(score: float, baseline: float, margin: float = MARGIN) -> bool:
    """True when `score` is within `margin` points of `baseline`, or below it."""
    return score <= baseline + margin


def teacher_warning(*, task: str, metric: str, ensemble: float, baseline: dict, label_names: list[str],
                    epochs: int, fine_tune_layers: int, encoder_layers: int, lr: float,
                    checkpoints: list[str] | None = None) -> str:
    """The console and results.md warning for a teacher ensemble at chance level: what it scored, against
    which baseline, and the settings to try (with their current values)."""
    what = (f"predicting '{label_names[baseline['prediction']]}' for every example"
            if baseline["predictor"] == "majority" and label_names
            else f"predicting the training mean {baseline['prediction']:.3g} (a constant correlates 0)")
    larger_L = (f"a larger L (tasks.{task}.fine_tune_layers={fine_tune_layers}, the encoder has {encoder_layers})"
                if fine_tune_layers < encoder_layers else None)
    tries = [f"more teacher epochs (teachers.epochs={epochs})", larger_L, f"a higher teacher lr (teachers.lr={lr:g})"]
    if checkpoints is not None:  # the user's own teachers: nothing of kdlib's to tune
        tries = [f"checking that tasks.{task}.teacher_checkpoints {checkpoints} were fine-tuned on this task",
                 f"that their labels mean the task's ({label_names}; tasks.{task}.teacher_label_map maps them)"]
    return (f"task {task}: the teacher ensemble scores {ensemble:.2f} dev {metric}, within {MARGIN:g} points of the "
            f"{baseline['predictor']} baseline {baseline['score']:.2f} ({what}): the teachers are at chance level and "
            f"the student learns nothing from them. Try " + ", ".join(t for t in tries if t) + ".")
