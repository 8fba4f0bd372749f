"""Dev-set scores of every teacher member, the ensemble and the student; the summary table."""

from __future__ import annotations

import numpy as np

from kdlib.losses import ensemble_target
from kdlib.metrics import task_metrics

import torch


def ensemble_outputs(teacher_logits: np.ndarray, kind: str, method: str, temperature: float) -> np.ndarray:
    """(N, K, C) member outputs -> (N, C) ensemble outputs (regression: mean prediction).

    "weighted" is a training target that needs gold labels; as a predictor it is the logit average.
    """
    if kind == "regression" or method == "weighted":
        return teacher_logits.mean(1)
    return ensemble_target(torch.from_numpy(teacher_logits), method, temperature).numpy()


def member_scores(kind: str, metric: str, labels: np.ndarray, teacher_logits: np.ndarray) -> list[float]:
    """Primary score of each ensemble member: (N, K, C) outputs -> K scores."""
    return [task_metrics(kind, teacher_logits[:, k], labels)[metric] for k in range(teacher_logits.shape[1])]


def score_task(*, kind: str, metric: str, labels: np.ndarray, teacher_logits: np.ndarray,
               student_outputs: np.ndarray, ensemble: str, temperature: float) -> dict:
    """All metrics for members, ensemble and student on one task's dev set; `primary` picks `metric`.

    A task without teachers (teacher_logits of shape (N, 0, C)) has no members and no ensemble (None)."""
    members = [task_metrics(kind, teacher_logits[:, k], labels) for k in range(teacher_logits.shape[1])]
    ens = (task_metrics(kind, ensemble_outputs(teacher_logits, kind, ensemble, temperature), labels)
           if members else None)
    student = task_metrics(kind, student_outputs, labels)
    ens_primary = ens[metric] if ens else None
    return {
        "metric": metric,
        "members": members,
        "ensemble": ens,
        "student": student,
        "primary": {"members": [m[metric] for m in members], "ensemble": ens_primary, "student": student[metric],
                    # A share of a score at or below 0 (a chance-level correlation) means nothing.
                    "retained_pct": (100.0 * student[metric] / ens_primary if ens_primary and ens_primary > 0
                                     else float("nan"))},
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; floats with 2 decimals."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(scores: dict[str, dict], overhead: float | None,
                 baselines: dict[str, dict] | None = None) -> tuple[list[str], list[list]]:
    """Rows of the run summary: task, metric, baseline (kdlib.baselines: majority class or mean; "-" when not
    given), members, ensemble, student, retained %, overhead (None: "-", for students that do not share the
    teachers' layers)."""
    headers = ["task", "metric", "baseline", "teacher members", "teacher ensemble", "student", "retained %",
               "overhead"]
    rows = []
    for task, s in scores.items():
        p = s["primary"]
        base = (baselines or {}).get(task)
        rows.append([task, s["metric"], "-" if base is None else base["score"],
                     " / ".join(f"{m:.2f}" for m in p["members"]) or "- (no teacher)",
                     "-" if p["ensemble"] is None else p["ensemble"], p["student"],
                     p["retained_pct"], "-" if overhead is None else f"{overhead:.1%}"])
    return headers, rows
