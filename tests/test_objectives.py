"""distillation_loss and its parts, each against a hand computation in numpy."""

import math

import numpy as np
import pytest
import torch

from kdlib.losses import (distillation_loss, kd_classification_loss, masked_hard_loss, mse_logits_loss,
                          soft_cross_entropy, teacher_annealing_weight)

NAN = float("nan")

# B = 3 rows, K = 2 teachers, C = 3 classes; row 1 has no gold label (an augmented row).
STUDENT = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [-0.3, 1.2, 0.1]])
TEACHERS = np.array([[[2.0, 1.0, 0.0], [1.0, 1.5, -0.5]],
                     [[0.0, 1.0, 1.0], [0.5, 0.0, 2.5]],
                     [[-1.0, 2.0, 0.0], [0.0, 0.5, 1.0]]])
LABELS = np.array([0.0, NAN, 2.0])
LABELED = [0, 2]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce_labeled():
    """Hard cross-entropy over the labeled rows only."""
    return np.mean([-math.log(_softmax(STUDENT[i])[int(LABELS[i])]) for i in LABELED])


def _loss(objective, **kw):
    args = {"kind": "classification", "student": torch.tensor(STUDENT), "teacher_logits": torch.tensor(TEACHERS),
            "labels": torch.tensor(LABELS), "temperature": 2.0, "alpha": 0.7, "aggregation": "mean_logits",
            "wrong_teacher_weight": 0.5}
    return distillation_loss(objective, **{**args, **kw}).item()


def test_masked_hard_losses_against_hand_computation():
    s = torch.tensor(STUDENT)
    assert masked_hard_loss("classification", s, torch.tensor(LABELS)).item() == pytest.approx(_ce_labeled())
    int_labels = torch.tensor([0, -1, 2])  # -1 marks a missing label as well as NaN does
    assert masked_hard_loss("classification", s, int_labels).item() == pytest.approx(_ce_labeled())
    pred, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.5, NAN, 5.0])
    assert masked_hard_loss("regression", pred, y).item() == pytest.approx((0.25 + 4.0) / 2)
    # A batch without any gold label: 0, and backward still works (zero gradient).
    s = torch.tensor(STUDENT, requires_grad=True)
    none = masked_hard_loss("classification", s, torch.tensor([NAN, NAN, NAN]))
    none.backward()
    assert none.item() == 0.0 and s.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        masked_hard_loss("ranking", s, torch.tensor(LABELS))


def test_mse_logits_is_mkd_equation_6():
    """||z_T - z_S||^2 per row, over the mean of the teachers' logits, averaged over rows."""
    z_t = TEACHERS.mean(1)
    eq6 = np.mean(((z_t - STUDENT) ** 2).sum(-1))
    assert mse_logits_loss(torch.tensor(STUDENT), torch.tensor(z_t)).item() == pytest.approx(eq6)
    # Used alone as in MKD (alpha = 1), then mixed with the hard loss (rows without a label skipped).
    assert _loss("mse_logits", alpha=1.0) == pytest.approx(eq6)
    assert _loss("mse_logits", alpha=0.7) == pytest.approx(0.7 * eq6 + 0.3 * _ce_labeled())


def test_soft_ce_is_mtdnn_kd_averaged_with_the_hard_loss():
    """MT-DNN KD: Q = mean of the members' probabilities (eq. 3), CE against Q (eq. 4), averaged with the
    hard CE (alpha = 0.5); no temperature, so T does not change it."""
    q = _softmax(TEACHERS).mean(1)  # (B, C)
    soft = np.mean(-(q * np.log(_softmax(STUDENT))).sum(-1))
    assert soft_cross_entropy(torch.tensor(STUDENT), torch.tensor(q)).item() == pytest.approx(soft)
    expected = 0.5 * soft + 0.5 * _ce_labeled()
    for t in (1.0, 4.0):
        assert _loss("soft_ce", aggregation="mean_probs", alpha=0.5, temperature=t) == pytest.approx(expected, rel=1e-6)
    # With mean_logits the target is the softmax of the averaged logits.
    q2 = _softmax(TEACHERS.mean(1))
    soft2 = np.mean(-(q2 * np.log(_softmax(STUDENT))).sum(-1))
    assert _loss("soft_ce", alpha=0.5) == pytest.approx(0.5 * soft2 + 0.5 * _ce_labeled())


def _kl_t2(target_logits, t):
    p, q = _softmax(target_logits / t), _softmax(STUDENT / t)
    return np.mean((p * np.log(p / q)).sum(-1)) * t * t


def test_kl_is_road_kd_and_unchanged():
    """ROaD sec. 2.2: alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) CE, the same as kd_classification_loss."""
    t, alpha = 2.0, 0.7
    expected = alpha * _kl_t2(TEACHERS.mean(1), t) + (1 - alpha) * _ce_labeled()
    assert _loss("kl", temperature=t, alpha=alpha) == pytest.approx(expected, rel=1e-6)
    direct = kd_classification_loss(torch.tensor(STUDENT), torch.tensor(TEACHERS).mean(1), torch.tensor([0, -1, 2]),
                                    t, alpha)
    assert _loss("kl", temperature=t, alpha=alpha) == pytest.approx(direct.item(), rel=1e-12)


def test_weighted_multi_teacher_kd_through_the_entry_point():
    """ROaD sec. 2.3 with K = 2, W = 0.5. Row 0 (gold 0): teacher 1 right (argmax 0), teacher 2 wrong
    (argmax 1): weights (2 - 0.5) / 1 = 1.5 and 0.5, target (1.5 z1 + 0.5 z2) / 2. Row 1 has no gold label
    and row 2 (gold 2) has teacher 1 wrong, teacher 2 right: weights 0.5 and 1.5."""
    target = TEACHERS.mean(1).copy()
    target[0] = (1.5 * TEACHERS[0, 0] + 0.5 * TEACHERS[0, 1]) / 2
    target[2] = (0.5 * TEACHERS[2, 0] + 1.5 * TEACHERS[2, 1]) / 2
    expected = 0.7 * _kl_t2(target, 2.0) + 0.3 * _ce_labeled()
    assert _loss("kl", aggregation="weighted") == pytest.approx(expected, rel=1e-6)
    eq6 = np.mean(((target - STUDENT) ** 2).sum(-1))
    assert _loss("mse_logits", aggregation="weighted", alpha=1.0) == pytest.approx(eq6, rel=1e-6)


def test_teacher_annealing_weight_endpoints():
    assert teacher_annealing_weight(0, 5) == 0.0
    assert teacher_annealing_weight(2, 5) == 0.5
    assert teacher_annealing_weight(4, 5) == 1.0
    assert teacher_annealing_weight(0, 1) == 0.0
    for step, total in ((5, 5), (-1, 5), (0, 0)):
        with pytest.raises(ValueError):
            teacher_annealing_weight(step, total)


def test_teacher_annealing_replaces_the_alpha_mix():
    """hard weight = lambda, soft weight = 1 - lambda, whatever alpha says."""
    soft = _kl_t2(TEACHERS.mean(1), 2.0)
    assert _loss("kl", alpha=0.3, hard_weight=0.0) == pytest.approx(soft, rel=1e-6)
    assert _loss("kl", alpha=0.3, hard_weight=1.0) == pytest.approx(_ce_labeled(), rel=1e-6)
    assert _loss("kl", alpha=0.3, hard_weight=0.25) == pytest.approx(0.75 * soft + 0.25 * _ce_labeled(), rel=1e-6)
    q = _softmax(TEACHERS).mean(1)
    soft_ce = np.mean(-(q * np.log(_softmax(STUDENT))).sum(-1))
    lam = teacher_annealing_weight(3, 4)  # the last step: hard labels only
    assert _loss("soft_ce", aggregation="mean_probs", hard_weight=lam) == pytest.approx(_ce_labeled(), rel=1e-6)
    assert _loss("soft_ce", aggregation="mean_probs", hard_weight=0.0) == pytest.approx(soft_ce, rel=1e-6)
    with pytest.raises(ValueError, match="hard_weight"):
        _loss("kl", hard_weight=1.5)


def test_tasks_without_a_teacher_train_on_hard_labels_only():
    expected = _ce_labeled()
    assert _loss("hard", teacher_logits=None) == pytest.approx(expected)
    assert _loss("hard", alpha=0.1, hard_weight=0.0) == pytest.approx(expected)  # weight 1 regardless
    # The row without a gold label gets no gradient.
    s = torch.tensor(STUDENT, requires_grad=True)
    distillation_loss("hard", kind="classification", student=s, teacher_logits=None, labels=torch.tensor(LABELS),
                      temperature=1.0, alpha=0.5, aggregation="mean_logits").backward()
    assert s.grad[1].abs().sum().item() == 0.0 and s.grad[0].abs().sum().item() > 0
    pred, y = torch.tensor([[1.0], [2.0]]), torch.tensor([2.0, NAN])
    got = distillation_loss("hard", kind="regression", student=pred, teacher_logits=None, labels=y,
                            temperature=1.0, alpha=0.5, aggregation="mean")
    assert got.item() == pytest.approx(1.0)


def test_regression_is_mse_to_the_teachers_mean_plus_hard_mse():
    pred = torch.tensor([[1.0], [2.0], [3.0]])
    teachers = torch.tensor([[[1.0], [2.0]], [[2.0], [2.0]], [[4.0], [5.0]]])  # means 1.5, 2.0, 4.5
    y = torch.tensor([1.0, NAN, 4.0])
    soft = np.mean([0.25, 0.0, 2.25])
    hard = np.mean([0.0, 1.0])  # the NaN label is skipped
    for objective in ("kl", "mse_logits", "soft_ce"):
        got = distillation_loss(objective, kind="regression", student=pred, teacher_logits=teachers, labels=y,
                                temperature=2.0, alpha=0.4, aggregation="mean")
        assert got.item() == pytest.approx(0.4 * soft + 0.6 * hard)
    annealed = distillation_loss("kl", kind="regression", student=pred, teacher_logits=teachers, labels=y,
                                 temperature=2.0, alpha=0.4, aggregation="mean", hard_weight=1.0)
    assert annealed.item() == pytest.approx(hard)
    with pytest.raises(ValueError, match="'mean'"):
        distillation_loss("kl", kind="regression", student=pred, teacher_logits=teachers, labels=y,
                          temperature=2.0, alpha=0.4, aggregation="mean_logits")


def test_invalid_requests_fail_fast():
    with pytest.raises(ValueError, match="unknown objective"):
        _loss("cosine")
    with pytest.raises(ValueError, match="needs teacher logits"):
        _loss("kl", teacher_logits=None)
    with pytest.raises(ValueError, match="mean_logits or weighted"):
        _loss("mse_logits", aggregation="mean_probs")
    with pytest.raises(ValueError, match="unknown kind"):
        _loss("kl", kind="ranking")
    with pytest.raises(ValueError, match="gold labels"):
        _loss("hard", labels=None)
    with pytest.raises(ValueError, match="gold labels"):
        _loss("kl", aggregation="weighted", labels=None)
