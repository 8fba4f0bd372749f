"""Distillation losses and ensemble targets.

KD for classification follows Hinton et al. (2015) as used in ROaD (sec. 2.2): the KL divergence
between teacher and student distributions at temperature T (same T for both), scaled by T^2 so its
gradients keep their size as T changes, mixed with the hard-label cross-entropy by alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ensemble_target(teacher_logits: torch.Tensor, method: str, temperature: float = 1.0) -> torch.Tensor:
    """Combine K teachers into one soft target.

    Args:
        teacher_logits: (B, K, C) every member's logits (C = 1 for regression).
        method: "mean_logits" (ROaD sec. 3: averaged logits), or "mean_probs" (MT-DNN KD eq. 3:
            averaged class probabilities at `temperature`, returned as log-probabilities so the
            result can be used as logits: softmax(log p) = p).
    Returns:
        (B, C) target logits.
    """
    if method == "mean_logits":
        return teacher_logits.mean(1)
    if method == "mean_probs":
        probs = F.softmax(teacher_logits / temperature, dim=-1).mean(1)  # (B, C)
        return probs.clamp_min(1e-12).log() * temperature  # so that (x / T).softmax() == probs
    raise ValueError(f"unknown ensemble method {method!r}; allowed: mean_logits, mean_probs")


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
