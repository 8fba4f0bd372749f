"""LazyAdamW against torch.optim.AdamW, and clipping with sparse embedding gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

import pytest

from kdlib.optim import LazyAdamW, clip_grad_norm, scheduled_lr, sparse_embeddings


def _model(sparse: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 6), nn.Linear(6, 3))
    if sparse:
        assert sparse_embeddings(model, 50) == 1
    return model


def _loss(model, ids):
    return model(ids).pow(2).sum(-1).mean()


def test_dense_parameters_follow_torch_adamw_exactly():
    ours, ref = _model(False), _model(False)
    opt_a = LazyAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
            _loss(model, ids).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close(a, b)


def test_sparse_rows_update_like_adamw_and_untouched_rows_stay():
    """Every step touches rows 0..9 only: those follow dense AdamW exactly; rows 10..49 never move (dense
    AdamW would decay them)."""
    ours, ref = _model(True), _model(False)
    before = ours[0].weight.detach().clone()
    opt_a = LazyAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        ids = torch.randperm(10, generator=torch.Generator().manual_seed(step)).reshape(2, 5)
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
            _loss(model, ids).backward()
            opt.step()
    assert ours[0].weight.grad.is_sparse
    assert_close(ours[0].weight[:10], ref[0].weight[:10])
    assert_close(ours[1].weight, ref[1].weight)
    assert torch.equal(ours[0].weight[10:], before[10:])


def test_clipping_counts_sparse_and_dense_gradients():
    sparse, dense = _model(True), _model(False)
    ids = torch.tensor([[1, 2, 2, 7]])
    for model in (sparse, dense):
        (100 * _loss(model, ids)).backward()
    want = torch.nn.utils.clip_grad_norm_(list(dense.parameters()), 1.0)
    got = clip_grad_norm(list(sparse.parameters()), 1.0)
    assert abs(got - float(want)) < 1e-4 * float(want)
    assert_close(sparse[0].weight.grad.to_dense(), dense[0].weight.grad)
    assert_close(sparse[1].weight.grad, dense[1].weight.grad)


def test_linear_schedule_decays_to_zero_like_transformers():
    """lr_schedule linear: base * (1 - step / total), the same rates as transformers' linear schedule with no
    warm-up; constant keeps the base rate; steps outside the run and unknown names are refused."""
    from transformers import get_linear_schedule_with_warmup

    total, base = 7, 5e-4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=total)
    for step in range(total):
        assert scheduled_lr(base, "linear", step, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        ref.step()
    assert scheduled_lr(base, "linear", 0, total) == base
    assert scheduled_lr(base, "linear", total - 1, total) == pytest.approx(base / total)
    assert scheduled_lr(base, "constant", total - 1, total) == base
    with pytest.raises(ValueError, match="outside"):
        scheduled_lr(base, "linear", total, total)
    with pytest.raises(ValueError, match="cosine"):
        scheduled_lr(base, "cosine", 0, total)
