"""Multi-task step schedules: which task(s) each training step takes a mini-batch from.

Every function is pure and deterministic given its `rng`: Ray Train workers seed one generator identically
(e.g. `np.random.default_rng([seed, epoch])`), so they all follow the same task sequence and reduce the
same branch's gradients in the same step.

- `mtdnn_schedule`: MT-DNN Algorithm 1 (also MKD Algorithm 1): every task's mini-batches merged and
  shuffled each epoch; one task per step.
- `temperature_sampling_schedule`: tasks drawn i.i.d. with probability proportional to |D_t|^tau
  (tau = 1: proportional to size, tau = 0: uniform, in between: small tasks up-weighted).
- `road_schedule`: ROaD Algorithm 1: each step takes batches of k distinct, randomly chosen tasks and
  averages their gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def mtdnn_schedule(n_batches: Mapping[str, int], rng: np.random.Generator) -> list[str]:
    """MT-DNN Algorithm 1: task t appears exactly n_batches[t] times, in a random order.

    Args:
        n_batches: task -> its number of mini-batches this epoch (>= 0); at least one task.
        rng: seeded identically on every worker.
    Returns:
        One task name per step, sum(n_batches.values()) steps.
    """
    _check_tasks(n_batches)
    for task, n in n_batches.items():
        if int(n) != n or n < 0:
            raise ValueError(f"n_batches[{task!r}] must be a non-negative integer, got {n!r}")
    schedule = [t for t, n in n_batches.items() for _ in range(int(n))]
    rng.shuffle(schedule)
    return schedule


def task_sampling_probs(sizes: Mapping[str, int], tau: float) -> dict[str, float]:
    """p_t = |D_t|^tau / sum_s |D_s|^tau, for tasks with sizes >= 1 and tau >= 0 (computed in log space)."""
    _check_tasks(sizes)
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    for task, n in sizes.items():
        if not n >= 1:
            raise ValueError(f"sizes[{task!r}] must be >= 1, got {n!r}")
    logits = tau * np.log(np.array([float(n) for n in sizes.values()]))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return dict(zip(sizes, p.tolist()))


def temperature_sampling_schedule(sizes: Mapping[str, int], tau: float, steps: int,
                                  rng: np.random.Generator) -> list[str]:
    """`steps` tasks drawn independently with p_t proportional to |D_t|^tau (see `task_sampling_probs`).

    Args:
        sizes: task -> |D_t|, its number of training examples (or batches). tau: >= 0. steps: >= 0.
        rng: seeded identically on every worker.
    """
    probs = task_sampling_probs(sizes, tau)
    _check_steps(steps)
    tasks = list(probs)
    draws = rng.choice(len(tasks), size=steps, p=np.array(list(probs.values())))
    return [tasks[i] for i in draws]


def road_schedule(tasks: Sequence[str], k: int, steps: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """ROaD Algorithm 1: per step, k distinct tasks chosen uniformly at random (their gradients are averaged).

    Args:
        tasks: the task names, distinct, at least one. k: 1 <= k <= len(tasks). steps: >= 0.
        rng: seeded identically on every worker.
    Returns:
        `steps` tuples of k task names each, in the order of `tasks` (a fixed order for the gradient
        all-reduces).
    """
    tasks = list(tasks)
    _check_tasks(tasks)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct, got {tasks}")
    if not 1 <= k <= len(tasks):
        raise ValueError(f"k must be between 1 and the number of tasks ({len(tasks)}), got {k}")
    _check_steps(steps)
    return [tuple(tasks[i] for i in sorted(rng.choice(len(tasks), size=k, replace=False))) for _ in range(steps)]


def _check_tasks(tasks) -> None:
    if len(tasks) == 0:
        raise ValueError("no tasks to schedule")


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
