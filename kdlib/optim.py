"""The training step kdlib's loops share (`Optimization`): AdamW that updates only the embedding rows a
step touched, gradient clipping that handles them, and the learning-rate schedule.

End-to-end students own vocabulary-sized embedding tables (30,522 WordPiece rows; CMOW keeps 1,200 numbers
per row, 36.6M parameters). A dense AdamW step rewrites all of them every step: on one CPU thread 1.7 s
for CMOW against 14 ms for its forward pass. With `sparse=True` embeddings the gradient holds only the
rows in the batch, and `LazyAdamW` moves only those rows and their moments (the "lazy Adam" of
TensorFlow's LazyAdam and torch's SparseAdam; decoupled weight decay applies to the same rows). Dense
parameters follow torch.optim.AdamW exactly (tests/test_optim.py checks both against it).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) for dense gradients; for sparse gradients, the same update on the
    touched rows only. State per parameter: step, exp_avg, exp_avg_sq (what kdlib.train_state saves)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    rows, values = g.indices()[0], g.values()
                    m = state["exp_avg"][rows].mul_(b1).add_(values, alpha=1 - b1)
                    v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                    state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
                    w = p[rows].mul_(1 - lr * wd)
                    p[rows] = w.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
                else:
                    p.mul_(1 - lr * wd)
                    state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(state["exp_avg"], (state["exp_avg_sq"] / bc2).sqrt_().add_(eps), value=-lr / bc1)


def sparse_embeddings(model: nn.Module, vocab_size: int) -> int:
    """Switch the model's vocabulary-sized nn.Embedding tables to sparse gradients; returns how many."""
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
    for m in tables:
        m.sparse = True
        m.weight._kdlib_sparse = True  # so gradient averaging knows the table even when a batch left it untouched
    return len(tables)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for a mix of dense and sparse gradients; returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = [(g.coalesce().values() if g.is_sparse else g).pow(2).sum() for g in grads]
    total = math.sqrt(sum(float(s) for s in squares)) if squares else 0.0
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of step `step` in [0, total_steps): `constant` keeps base_lr; `linear` decays it
    linearly to 0 over the run, base_lr * (1 - step / total_steps) (the CMOW paper's schedule, no warm-up;
    transformers' get_linear_schedule_with_warmup with 0 warm-up steps gives the same); `warmup_linear` is
    BERT's: a linear warm-up over the first 10% of steps, then a linear decay to 0 (the teachers' and Tune
    trials' schedule; the factor is the LambdaLR lambda they used, so their rates are unchanged)."""
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - step / total_steps)
    if schedule == "warmup_linear":
        w = max(1, int(total_steps * 0.1))
        return base_lr * min((step + 1) / w, max(0.0, (total_steps - step) / max(1, total_steps - w)))
    raise ValueError(f"unknown lr_schedule {schedule!r} (constant, linear or warmup_linear)")


class Optimization:
    """Optimizer, schedule, clipping and step counter of a training loop: the teachers' partial fine-tuning,
    Tune trials, distillation and per-task fine-tuning all step through this class, so that what every step
    needs (device placement, mixed precision) goes in once.

    A step: `zero_grad()`, `backward(loss)` once or more (ROaD sums several tasks' losses), any edits of the
    gradients (distillation averages them across workers here), then `step()`. `backward` and `step` are the
    only places that touch the loss or the gradients' scale: a GradScaler's scale() belongs in the first,
    its unscale_() (before clipping), step() and update() in the second.

    Args:
        params: parameters, or torch-style groups ({"params": ..., "lr": ...}), each group with its own base lr.
        lr: the base lr of groups that do not set one.
        schedule: `scheduled_lr`'s schedule, applied to every group's base lr.
        total_steps: the run's steps; may be set later, before the first `step()` (distillation restores a
            checkpoint into the optimizer before it has counted its rows).
    Attributes:
        optimizer: the LazyAdamW (what kdlib.train_state saves and restores).
        steps_done: steps taken, the index of the next one; a resumed run sets it from its checkpoint.
    """

    def __init__(self, params, *, lr: float, weight_decay: float, schedule: str = "constant",
                 total_steps: int | None = None, max_grad_norm: float = 1.0, precision: str = "fp32",
                 device: torch.device | str = "cpu"):
        self.optimizer = LazyAdamW(params, lr=lr, weight_decay=weight_decay)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.schedule, self.total_steps, self.max_grad_norm = schedule, total_steps, max_grad_norm
        self.steps_done = 0
        # fp16 gradients underflow: the loss is scaled up before backward and the gradients down before
        # clipping; a step whose gradients overflowed is skipped and the scale lowered (torch.amp.GradScaler).
        # bf16 has fp32's range and needs none. The scaler's state is not checkpointed: a resumed run
        # starts from the initial scale and finds its level again within a few steps.
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
        self.skipped_steps = 0  # fp16 steps skipped for overflowing gradients

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Clip the gradients as they are now, set every group's lr for this step, update, count the step;
        returns the first group's lr. With fp16 the gradients are unscaled first, and a step with inf or NaN
        gradients changes no weight (distillation averages gradients before this, so every worker sees the
        same ones and skips alike)."""
        if self.total_steps is None:
            raise ValueError("Optimization.total_steps is not set")
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        clip_grad_norm(self.params, self.max_grad_norm)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = scheduled_lr(base_lr, self.schedule, self.steps_done, self.total_steps)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.steps_done += 1
        return self.optimizer.param_groups[0]["lr"]
