"""Distillation losses and ensemble targets.

KD for classification follows Hinton et al. (2015) as used in ROaD (sec. 2.2): the KL divergence
between teacher and student distributions at temperature T (same T for both), scaled by T^2 so its
gradients keep their size as T changes, mixed with the hard-label cross-entropy by alpha.

`distillation_loss` is the one entry point the training loop calls; it selects among the papers'
objectives: "kl" (ROaD sec. 2.2), "mse_logits" (MKD eq. 6), "soft_ce" (MT-DNN KD sec. 3) and "hard"
(tasks without a teacher), with an optional teacher-annealing weight (`teacher_annealing_weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


AGGREGATIONS = ("mean_logits", "mean_probs", "weighted", "mean")
OBJECTIVES = ("kl", "mse_logits", "soft_ce", "hard")


def ensemble_target(teacher_logits: torch.Tensor, method: str, temperature: float = 1.0,
                    labels: torch.Tensor | None = None, wrong_weight: float = 0.5) -> torch.Tensor:
    """Combine K teachers into one soft target (aggregation happens at training time, from stored logits).

    Args:
        teacher_logits: (B, K, C) every member's logits (C = 1 for regression).
        method: "mean_logits" (ROaD sec. 3: averaged logits); "mean_probs" (MT-DNN KD eq. 3: averaged class
            probabilities at `temperature`, returned as log-probabilities times T, so that
            softmax(result / T) equals the averaged probabilities); "weighted" (ROaD sec. 2.3, weighted KD,
            see `weighted_teacher_logits`); "mean" (regression: the mean prediction).
        labels: (B,) gold class ids, -1 where there is none; needed by "weighted".
        wrong_weight: W < 1, the weight of a teacher that is wrong on the gold label ("weighted").
    Returns:
        (B, C) target logits (regression: (B, 1) predictions).
    """
    if method in ("mean_logits", "mean"):
        return teacher_logits.mean(1)
    if method == "mean_probs":
        probs = F.softmax(teacher_logits / temperature, dim=-1).mean(1)  # (B, C)
        return probs.clamp_min(1e-12).log() * temperature  # so that (x / T).softmax() == probs
    if method == "weighted":
        if labels is None:
            raise ValueError("weighted aggregation needs the gold labels")
        return weighted_teacher_logits(teacher_logits, labels, wrong_weight)
    raise ValueError(f"unknown aggregation {method!r}; allowed: {', '.join(AGGREGATIONS)}")


def weighted_teacher_logits(teacher_logits: torch.Tensor, labels: torch.Tensor, wrong_weight: float) -> torch.Tensor:
    """ROaD weighted KD (sec. 2.3): teachers wrong on the gold label count W < 1, the right ones share the rest.

    Per example with K teachers of which m are right (argmax == gold): a wrong teacher's weight is W, a
    right one's is (K - (K - m) W) / m, so the weights still sum to K and the target
    sum_k w_k z_k / K stays in the range of the plain logit average. With no right teacher, no wrong
    teacher, or no gold label (-1: augmented and unlabeled rows), it is the plain average.
    """
    k = teacher_logits.shape[1]
    right = (teacher_logits.argmax(-1) == labels.unsqueeze(1)).to(teacher_logits.dtype)  # (B, K)
    m = right.sum(1, keepdim=True)
    mixed = (m > 0) & (m < k) & (labels.unsqueeze(1) >= 0)
    w_right = (k - (k - m) * wrong_weight) / m.clamp_min(1)
    weights = torch.where(right.bool(), w_right, torch.full_like(right, wrong_weight))
    weights = torch.where(mixed, weights, torch.ones_like(weights))
    return (weights.unsqueeze(-1) * teacher_logits).sum(1) / k


def kd_classification_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                           temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).

    Args:
        student, teacher: (B, C) logits. labels: (B,) class ids, -1 where an example has no gold label
            (its hard term is skipped), or None for no hard term at all.
    """
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    p_t = F.softmax(teacher / t, dim=-1)
    kl = (p_t * (p_t.clamp_min(1e-12).log() - log_p_s)).sum(-1).mean() * t * t
    hard = _masked_mean(F.cross_entropy(student, labels.clamp_min(0), reduction="none"), labels >= 0) \
        if labels is not None else student.new_zeros(())
    return alpha * kl + (1 - alpha) * hard


def kd_regression_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                       alpha: float) -> torch.Tensor:
    """alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, labels); NaN labels are skipped.

    Args:
        student: (B, 1) or (B,) predictions. teacher: (B, 1) or (B,) ensemble predictions. labels: (B,).
    """
    s, t = student.reshape(-1), teacher.reshape(-1)
    soft = F.mse_loss(s, t)
    if labels is None:
        return alpha * soft + (1 - alpha) * s.new_zeros(())
    y = labels.reshape(-1).to(s.dtype)
    ok = ~torch.isnan(y)
    hard = _masked_mean((s - torch.nan_to_num(y)) ** 2, ok)
    return alpha * soft + (1 - alpha) * hard


def hard_loss(kind: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain supervised loss: cross-entropy (classification) or MSE (regression)."""
    if kind == "classification":
        return F.cross_entropy(outputs, labels.long())
    return F.mse_loss(outputs.reshape(-1), labels.reshape(-1).to(outputs.dtype))


def masked_hard_loss(kind: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label loss over the rows that have a gold label: cross-entropy or MSE.

    Augmented and unlabeled rows carry no gold label (classification: -1 or NaN; regression: NaN); they
    are left out of the mean. A batch with no labeled row gives 0 (still attached to `outputs`).

    Args:
        kind: "classification" or "regression".
        outputs: (B, C) logits, or (B, 1) / (B,) predictions.
        labels: (B,) class ids (int, or float with NaN) or regression targets (float, NaN = missing).
    """
    if kind == "classification":
        y = _class_labels(labels)
        return _masked_mean(F.cross_entropy(outputs, y.clamp_min(0), reduction="none"), y >= 0)
    if kind == "regression":
        s, y = outputs.reshape(-1), labels.reshape(-1).to(outputs.dtype)
        return _masked_mean((s - torch.nan_to_num(y)) ** 2, ~torch.isnan(y))
    raise ValueError(f"unknown kind {kind!r}; allowed: classification, regression")


def mse_logits_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MKD eq. 6: ||z_T - z_S||_2^2 per example (summed over classes), averaged over the batch.

    Args:
        student, teacher: (B, C) logits.
    """
    return ((teacher - student) ** 2).sum(-1).mean()


def soft_cross_entropy(student: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """MT-DNN KD eq. 4: -sum_c Q(c|X) log P(c|X), averaged over the batch.

    Args:
        student: (B, C) logits. target_probs: (B, C) soft targets Q (rows sum to 1), e.g. the ensemble's
            mean class probabilities (eq. 3).
    """
    return -(target_probs * F.log_softmax(student, dim=-1)).sum(-1).mean()


def teacher_annealing_weight(step: int, total_steps: int) -> float:
    """Teacher annealing (Clark et al. 2019, compared in ROaD sec. 3.3): the hard-label weight lambda rises
    linearly from 0 at the first step (pure distillation) to 1 at the last (pure hard labels).

    Pass it as `distillation_loss(..., hard_weight=lambda)`. Args: step in [0, total_steps); total_steps >= 1
    (a single step counts as the first: 0).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    return step / (total_steps - 1) if total_steps > 1 else 0.0


def distillation_loss(objective: str, *, kind: str, student: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, temperature: float, alpha: float, aggregation: str,
                      wrong_teacher_weight: float = 0.5, hard_weight: float | None = None) -> torch.Tensor:
    """One task's loss on one mini-batch: soft_weight * soft + hard_weight * hard.

    The weights are (alpha, 1 - alpha), or (1 - hard_weight, hard_weight) when teacher annealing passes
    `hard_weight`. The hard term skips rows without a gold label; the soft term covers every row.

    Objectives (classification):
        "kl": ROaD sec. 2.2, T^2 * KL(softmax(target / T) || softmax(student / T)), the target being the
            teachers aggregated by `aggregation` ("weighted": ROaD sec. 2.3 weighted KD).
        "mse_logits": MKD eq. 6, squared distance between the student's and the aggregated teachers'
            logits ("mean_logits" or "weighted"). MKD trains on it alone: alpha = 1.
        "soft_ce": MT-DNN KD sec. 3, cross-entropy against the ensemble's probabilities (eq. 3-4; with
            aggregation "mean_probs" these are the members' mean probabilities), at T = 1 as in the paper:
            `temperature` is not used (with T it would equal "kl" up to a constant). MT-DNN KD averages it
            with the hard loss: alpha = 0.5.
        "hard": no teacher (MT-DNN KD trains some tasks this way): the hard loss alone, weight 1;
            `teacher_logits` may be None and alpha / hard_weight are not used.
    Regression: every teacher objective is MSE against the teachers' mean prediction mixed with the hard
    MSE (aggregation must be "mean"); "hard" is the hard MSE alone.

    Args:
        student: (B, C) logits, or (B, 1) / (B,) regression predictions.
        teacher_logits: (B, K, C) every teacher's logits (C = 1 for regression), or None for "hard".
        labels: (B,) gold labels; -1 or NaN (classification) / NaN (regression) where a row has none;
            None for no hard term.
        temperature: T of "kl". alpha: weight of the soft term. aggregation: see `ensemble_target`.
        wrong_teacher_weight: W of "weighted" aggregation. hard_weight: lambda of teacher annealing.
    Returns:
        A scalar tensor.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if kind not in ("classification", "regression"):
        raise ValueError(f"unknown kind {kind!r}; allowed: classification, regression")
    if objective == "hard":
        if labels is None:
            raise ValueError('objective "hard" needs the gold labels')
        return masked_hard_loss(kind, student, labels)
    if teacher_logits is None:
        raise ValueError(f'objective {objective!r} needs teacher logits; use "hard" for a task without a teacher')
    if hard_weight is not None and not 0 <= hard_weight <= 1:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    soft_weight = alpha if hard_weight is None else 1 - hard_weight
    if kind == "regression":
        if aggregation != "mean":
            raise ValueError(f"regression teachers aggregate by 'mean', not {aggregation!r}")
        return kd_regression_loss(student, ensemble_target(teacher_logits, "mean"), labels, soft_weight)
    y = _class_labels(labels) if labels is not None else None
    if objective == "kl":
        target = ensemble_target(teacher_logits, aggregation, temperature, labels=y, wrong_weight=wrong_teacher_weight)
        return kd_classification_loss(student, target, y, temperature, soft_weight)
    if objective == "mse_logits":
        if aggregation not in ("mean_logits", "weighted"):
            raise ValueError(f"mse_logits regresses on logits: aggregation must be mean_logits or weighted, "
                             f"not {aggregation!r}")
        target = ensemble_target(teacher_logits, aggregation, labels=y, wrong_weight=wrong_teacher_weight)
        soft = mse_logits_loss(student, target)
    else:  # soft_ce
        target = ensemble_target(teacher_logits, aggregation, 1.0, labels=y, wrong_weight=wrong_teacher_weight)
        soft = soft_cross_entropy(student, F.softmax(target, dim=-1))  # (B, C) probabilities
    hard = masked_hard_loss(kind, student, y) if y is not None else student.new_zeros(())
    return soft_weight * soft + (1 - soft_weight) * hard


def binned_regression_loss(student: torch.Tensor, teacher_outputs: torch.Tensor | None, labels: torch.Tensor,
                           bins, *, alpha: float, hard_weight: float | None = None) -> torch.Tensor:
    """A regression task learned as classification over score bins (CMOW paper sec. IV-B, STS-B).

    Targets are distributions over the bins: the teachers' mean prediction for the soft term and the gold
    score for the hard term, each split between its two neighbouring bin centres so that its expectation
    is the score itself (`ScoreBins.to_distribution(soft=True)`). Both terms are cross-entropies against
    the student's softmax, mixed like `distillation_loss` (alpha, or teacher annealing's hard_weight).
    Rows without a gold score (NaN) get the soft term only; without teachers (None, or K = 0) the hard
    term alone is the loss.

    Args:
        student: (B, n_bins) logits. teacher_outputs: (B, K, 1) every teacher's predicted score.
        labels: (B,) gold scores, NaN where missing. bins: a kdlib.students.ScoreBins.
    """
    logp = F.log_softmax(student, dim=-1)
    has = ~torch.isnan(labels)
    hard = student.new_zeros(())
    if has.any():
        hard = -(bins.to_distribution(labels[has], soft=True).to(logp.dtype) * logp[has]).sum(-1).mean()
    if teacher_outputs is None or teacher_outputs.shape[1] == 0:
        return hard
    target = bins.to_distribution(teacher_outputs.mean(1).reshape(-1), soft=True).to(logp.dtype)
    soft = -(target * logp).sum(-1).mean()
    soft_weight = alpha if hard_weight is None else 1 - hard_weight
    return soft_weight * soft + (1 - soft_weight) * hard


def _class_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class ids as int64 with -1 for a missing label (float labels carry NaN there)."""
    if labels.is_floating_point():
        labels = torch.nan_to_num(labels, nan=-1.0)
    return labels.long()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
