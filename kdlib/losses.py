"""Distillation losses and ensemble targets.

KD for classification follows Hinton et al. (2015) as used in ROaD (sec. 2.2): the KL divergence
between teacher and student distributions at temperature T (same T for both), scaled by T^2 so its
gradients keep their size as T changes, mixed with the hard-label cross-entropy by alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


AGGREGATIONS = ("mean_logits", "mean_probs", "weighted", "mean")


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
