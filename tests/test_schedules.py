"""Task schedules: exact counts, one sequence for every worker given the shared seed, the sampling formula."""

from collections import Counter

import numpy as np
import pytest

from kdlib.schedules import mtdnn_schedule, road_schedule, task_sampling_probs, temperature_sampling_schedule


def _worker_rngs(seed=7, epoch=3):
    """Two Ray Train workers seed their shared generator the same way (distill.py: [seed, epoch])."""
    return np.random.default_rng([seed, epoch]), np.random.default_rng([seed, epoch])


def test_mtdnn_schedule_has_every_batch_once_and_is_shared_by_workers():
    n = {"sst2": 5, "mrpc": 2, "stsb": 3, "empty": 0}
    a, b = _worker_rngs()
    schedule = mtdnn_schedule(n, a)
    assert Counter(schedule) == {"sst2": 5, "mrpc": 2, "stsb": 3}
    assert mtdnn_schedule(n, b) == schedule
    assert mtdnn_schedule(n, np.random.default_rng([7, 4])) != schedule  # next epoch: a new order
    # The same sequence as distill.py's inline schedule, so swapping it in keeps runs reproducible.
    inline = [t for t in n for _ in range(n[t])]
    np.random.default_rng([7, 3]).shuffle(inline)
    assert schedule == inline


def test_mtdnn_schedule_validation():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no tasks"):
        mtdnn_schedule({}, rng)
    with pytest.raises(ValueError, match="non-negative integer"):
        mtdnn_schedule({"a": -1}, rng)
    with pytest.raises(ValueError, match="non-negative integer"):
        mtdnn_schedule({"a": 1.5}, rng)


SIZES = {"small": 100, "mid": 400, "large": 1600}


@pytest.mark.parametrize("tau, expected", [
    (0.0, [1 / 3, 1 / 3, 1 / 3]),             # uniform
    (0.5, [10 / 70, 20 / 70, 40 / 70]),       # sqrt sizes 10, 20, 40
    (1.0, [100 / 2100, 400 / 2100, 1600 / 2100]),  # proportional
])
def test_temperature_sampling_follows_the_formula(tau, expected):
    probs = task_sampling_probs(SIZES, tau)
    np.testing.assert_allclose(list(probs.values()), expected, rtol=1e-12)
    steps = 20000
    a, b = _worker_rngs()
    schedule = temperature_sampling_schedule(SIZES, tau, steps, a)
    assert len(schedule) == steps
    assert temperature_sampling_schedule(SIZES, tau, steps, b) == schedule
    counts = Counter(schedule)
    for task, p in zip(SIZES, expected):
        # 5 standard deviations of a binomial frequency: about 0.017 at p = 1/3
        assert counts[task] / steps == pytest.approx(p, abs=5 * np.sqrt(p * (1 - p) / steps))


def test_temperature_sampling_is_stable_for_huge_sizes_and_validates():
    probs = task_sampling_probs({"a": 10**12, "b": 10**6}, 3.0)  # 1e36 and 1e18: no overflow in log space
    assert probs["a"] == pytest.approx(1.0) and probs["b"] == pytest.approx(1e-18)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tau"):
        temperature_sampling_schedule(SIZES, -0.5, 10, rng)
    with pytest.raises(ValueError, match="tau"):
        temperature_sampling_schedule(SIZES, float("nan"), 10, rng)
    with pytest.raises(ValueError, match="no tasks"):
        temperature_sampling_schedule({}, 1.0, 10, rng)
    with pytest.raises(ValueError, match=">= 1"):
        temperature_sampling_schedule({"a": 0, "b": 3}, 0.0, 10, rng)
    with pytest.raises(ValueError, match="steps"):
        temperature_sampling_schedule(SIZES, 1.0, -1, rng)
    assert temperature_sampling_schedule(SIZES, 1.0, 0, rng) == []


def test_road_schedule_takes_k_distinct_tasks_per_step():
    tasks = ["sst2", "mrpc", "stsb", "qnli"]
    a, b = _worker_rngs()
    steps = 8000
    schedule = road_schedule(tasks, 2, steps, a)
    assert road_schedule(tasks, 2, steps, b) == schedule
    assert len(schedule) == steps
    for step in schedule:
        assert len(step) == 2 and len(set(step)) == 2
        assert list(step) == sorted(step, key=tasks.index)  # one fixed order for the all-reduces
    # Uniform choice: each task is in a step with probability k / n = 1/2.
    counts = Counter(t for step in schedule for t in step)
    for t in tasks:
        assert counts[t] / steps == pytest.approx(0.5, abs=5 * np.sqrt(0.25 / steps))
    assert road_schedule(tasks, 4, 3, np.random.default_rng(0)) == [tuple(tasks)] * 3  # k = n: every task


def test_road_schedule_validation():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be"):
        road_schedule(["a", "b"], 3, 5, rng)
    with pytest.raises(ValueError, match="k must be"):
        road_schedule(["a", "b"], 0, 5, rng)
    with pytest.raises(ValueError, match="no tasks"):
        road_schedule([], 1, 5, rng)
    with pytest.raises(ValueError, match="distinct"):
        road_schedule(["a", "a"], 1, 5, rng)
    with pytest.raises(ValueError, match="steps"):
        road_schedule(["a", "b"], 1, -2, rng)
