import math

import numpy as np
import pytest
import torch

from kdlib.losses import ensemble_target, kd_classification_loss, kd_regression_loss


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_kd_classification_loss_against_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    T, alpha = 2.0, 0.3
    kl = 0.0
    for si, ti in zip(s.numpy(), t.numpy()):
        p, q = _softmax(ti / T), _softmax(si / T)
        kl += float((p * np.log(p / q)).sum())
    kl = kl / 2 * T * T
    ce = -np.mean([math.log(_softmax(s[i].numpy())[y[i]]) for i in range(2)])
    expected = alpha * kl + (1 - alpha) * ce
    assert kd_classification_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_missing_gold_labels_skip_the_hard_term_only():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    with_one = kd_classification_loss(s, t, torch.tensor([0, -1]), 1.0, 0.5)
    soft = kd_classification_loss(s, t, None, 1.0, 1.0)
    ce0 = -math.log(_softmax(np.array([1.0, 0.0]))[0])
    assert with_one.item() == pytest.approx(0.5 * soft.item() + 0.5 * ce0, rel=1e-5)


def test_kd_regression_loss_against_hand_computation():
    s, t, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.5, 2.0, 2.0]), torch.tensor([1.0, float("nan"), 4.0])
    soft = np.mean([0.25, 0.0, 1.0])
    hard = np.mean([0.0, 1.0])  # the NaN label is skipped
    assert kd_regression_loss(s, t, y, 0.4).item() == pytest.approx(0.4 * soft + 0.6 * hard, rel=1e-6)


def test_ensemble_targets():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (1, K=3, C=2)
    torch.testing.assert_close(ensemble_target(logits, "mean_logits"), torch.tensor([[1.0, 1.0]]))
    T = 2.0
    probs = np.mean([_softmax(row / T) for row in logits[0].numpy()], axis=0)  # MT-DNN KD eq. 3
    got = torch.softmax(ensemble_target(logits, "mean_probs", T) / T, -1)
    np.testing.assert_allclose(got.numpy()[0], probs, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation"):
        ensemble_target(logits, "median")


def test_weighted_kd_against_hand_computation():
    """ROaD sec. 2.3: K = 3 teachers, gold class 0; teachers 1 and 2 right, teacher 3 wrong (W = 0.4).
    Wrong weight 0.4; right weights (3 - 0.4) / 2 = 1.3 each; target = (1.3 z1 + 1.3 z2 + 0.4 z3) / 3."""
    z = torch.tensor([[[2.0, 0.0], [1.0, 0.5], [-1.0, 3.0]]])  # (B=1, K=3, C=2)
    y = torch.tensor([0])
    expected = (1.3 * z[0, 0] + 1.3 * z[0, 1] + 0.4 * z[0, 2]) / 3
    out = ensemble_target(z, "weighted", labels=y, wrong_weight=0.4)
    torch.testing.assert_close(out[0], expected)
    # The weights sum to K: a constant logit c for every teacher stays c (the average's range is kept).
    const = torch.full((1, 3, 2), 5.0)
    const[0, 2] = torch.tensor([5.0, 6.0])  # teacher 3 predicts class 1: wrong
    assert ensemble_target(const, "weighted", labels=y, wrong_weight=0.4)[0, 0].item() == pytest.approx(5.0)


def test_weighted_kd_falls_back_to_the_mean_without_a_split_verdict():
    """All right, all wrong, or no gold label (-1: augmented rows): the plain logit average."""
    z = torch.tensor([[[2.0, 0.0], [1.0, 0.5]], [[0.0, 2.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([0, 0, -1])
    torch.testing.assert_close(ensemble_target(z, "weighted", labels=y, wrong_weight=0.2), z.mean(1))
    with pytest.raises(ValueError, match="gold labels"):
        ensemble_target(z, "weighted")


def test_regression_aggregation_is_the_mean_prediction():
    z = torch.tensor([[[1.0], [2.0], [4.5]]])
    assert ensemble_target(z, "mean")[0, 0].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="allowed"):
        ensemble_target(z, "median")


def test_binned_regression_loss_against_a_hand_computation():
    """CMOW paper IV-B: scores as distributions over bins 0, 1, 2 (width 1); a score of 1.25 puts 0.75 on
    bin 1 and 0.25 on bin 2. Teachers 1.0 and 1.5 average to 1.25; the gold score 0 is all on bin 0."""
    from kdlib.losses import binned_regression_loss
    from kdlib.students.binning import ScoreBins

    logits = torch.tensor([[0.0, 1.0, 2.0]])
    logp = torch.log_softmax(logits, -1)[0]
    soft = -(0.75 * logp[1] + 0.25 * logp[2])
    hard = -logp[0]
    teachers = torch.tensor([[[1.0], [1.5]]])
    bins = ScoreBins(0.0, 2.0, 1.0)
    got = binned_regression_loss(logits, teachers, torch.tensor([0.0]), bins, alpha=0.8)
    assert got.item() == pytest.approx(0.8 * soft.item() + 0.2 * hard.item(), rel=1e-6)
    # No gold score: the soft term alone; no teachers: the hard term alone; annealing replaces alpha.
    assert binned_regression_loss(logits, teachers, torch.tensor([float("nan")]), bins, alpha=0.8).item() == \
        pytest.approx(0.8 * soft.item(), rel=1e-6)
    assert binned_regression_loss(logits, None, torch.tensor([0.0]), bins, alpha=0.8).item() == \
        pytest.approx(hard.item(), rel=1e-6)
    assert binned_regression_loss(logits, teachers, torch.tensor([0.0]), bins, alpha=0.8, hard_weight=1.0).item() \
        == pytest.approx(hard.item(), rel=1e-6)
