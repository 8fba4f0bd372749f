"""LazyAdamW against torch.optim.AdamW, clipping with sparse embedding gradients, the lr schedules, and the
Optimization step against the torch optimizer, scheduler and clipping it replaced."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

import pytest

from kdlib.optim import LazyAdamW, Optimization, clip_grad_norm, scheduled_lr, sparse_embeddings
from kdlib.train_state import load_train_state, save_train_state


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
    with pytest.raises(ValueError, match="warmup_linear"):
        scheduled_lr(base, "cosine", 0, total)


def _old_teachers_lambda(total_steps: int, warmup: float = 0.1):
    """kdlib.teachers._warmup_linear as it was before Optimization (the teachers' LambdaLR factor)."""
    w = max(1, int(total_steps * warmup))
    return lambda step: min((step + 1) / w, max(0.0, (total_steps - step) / max(1, total_steps - w)))


def _old_trial_lambda(steps: int):
    """The inline LambdaLR factor of kdlib.tune.trial.distill_student before Optimization."""
    warm = max(1, steps // 10)
    return lambda i: min((i + 1) / warm, max(0.0, (steps - i) / max(1, steps - warm)))


@pytest.mark.parametrize("total", [1, 3, 10, 37, 100, 1234])
def test_warmup_linear_gives_the_rates_the_old_lambdalr_gave(total):
    """Step by step the same rates, to the bit, as LambdaLR with the teachers' and the Tune trials' lambdas."""
    base = 3e-5
    rates = [scheduled_lr(base, "warmup_linear", step, total) for step in range(total)]
    for old in (_old_teachers_lambda(total), _old_trial_lambda(total)):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, old)
        for step in range(total):
            assert rates[step] == opt.param_groups[0]["lr"], step
            opt.step()
            sched.step()
    assert max(rates) == pytest.approx(base)  # reached at the end of the warm-up
    assert all(rate > 0 for rate in rates)  # the decay ends on the step after the last


def _two_group_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)


def _train(opt: Optimization, model: nn.Module, steps: range) -> list[float]:
    rates = []
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        opt.backward(100 * (model(x) - y).pow(2).mean())  # large: every step's gradient is clipped
        rates.append(opt.step())
    return rates


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-2}]


def test_optimization_steps_like_torch_adamw_lambdalr_and_clipping():
    """Two param groups with their own lrs, warm-up then decay, clipping at 1.0: the weights follow what the
    teachers ran before (torch AdamW + LambdaLR + clip_grad_norm_), and `step` counts and returns the lr."""
    total = 25
    ours, ref = _two_group_model(), _two_group_model()
    opt = Optimization(_groups(ours), lr=1e-2, weight_decay=0.01, schedule="warmup_linear", total_steps=total)
    rates = _train(opt, ours, range(total))

    torch_opt = torch.optim.AdamW(_groups(ref), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, _old_teachers_lambda(total))
    want_rates, norms = [], []
    for step in range(total):
        x, y = _batch(step)
        torch_opt.zero_grad(set_to_none=True)
        (100 * (ref(x) - y).pow(2).mean()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        want_rates.append([g["lr"] for g in torch_opt.param_groups])
        torch_opt.step()
        sched.step()

    assert min(norms) > 1.0  # the clipping was exercised
    assert rates == [head for head, _ in want_rates]
    assert [g["lr"] for g in opt.optimizer.param_groups] == want_rates[-1]  # each group its own base lr
    assert opt.steps_done == total
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close(a, b)
    assert not torch.equal(ours[0].weight, _two_group_model()[0].weight)


def test_optimization_resumes_from_a_train_state_checkpoint(tmp_path):
    """Ten steps straight equal six steps, a kdlib.train_state checkpoint, and four more in a fresh model and
    Optimization that takes its step count from the checkpoint (distillation's resume)."""
    straight = _two_group_model()
    _train(Optimization(_groups(straight), lr=1e-2, weight_decay=0.01, schedule="linear", total_steps=10),
           straight, range(10))

    first = _two_group_model()
    opt = Optimization(_groups(first), lr=1e-2, weight_decay=0.01, schedule="linear", total_steps=10)
    _train(opt, first, range(6))
    save_train_state(tmp_path, first, opt.optimizer, {"step": opt.steps_done})

    resumed = _two_group_model()
    opt = Optimization(_groups(resumed), lr=1e-2, weight_decay=0.01, schedule="linear")
    opt.steps_done = load_train_state(tmp_path, resumed, opt.optimizer)["step"]
    opt.total_steps = 10  # set after restoring, as distillation does once it has counted its rows
    rates = _train(opt, resumed, range(6, 10))
    assert rates == [scheduled_lr(1e-2, "linear", step, 10) for step in range(6, 10)]
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_optimization_steps_on_gradients_edited_after_backward():
    """Distillation averages gradients across workers between backward and step: step clips and applies the
    gradients as they are then. Averaging a twin's gradients of another batch into ours equals backward on
    the mean of both losses."""
    ours, twin, ref = _two_group_model(), _two_group_model(), _two_group_model()
    opt = Optimization(_groups(ours), lr=1e-2, weight_decay=0.01, total_steps=4)
    ref_opt = Optimization(_groups(ref), lr=1e-2, weight_decay=0.01, total_steps=4)
    for step in range(4):
        (x, y), (x2, y2) = _batch(step), _batch(100 + step)
        twin.load_state_dict(ours.state_dict())
        twin.zero_grad(set_to_none=True)
        (100 * (twin(x2) - y2).pow(2).mean()).backward()
        opt.zero_grad()
        opt.backward(100 * (ours(x) - y).pow(2).mean())
        for p, q in zip(ours.parameters(), twin.parameters()):
            p.grad.add_(q.grad).div_(2)
        opt.step()
        ref_opt.zero_grad()
        ref_opt.backward(100 * ((ref(x) - y).pow(2).mean() + (ref(x2) - y2).pow(2).mean()) / 2)
        ref_opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close(a, b)


def test_optimization_needs_its_run_length_before_stepping():
    model = _two_group_model()
    opt = Optimization(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt.zero_grad()
    opt.backward(model(torch.ones(1, 5)).sum())
    with pytest.raises(ValueError, match="total_steps"):
        opt.step()
