"""kdlib/tune/selection.py and kdlib/tune/config.py: the threshold rule (paper Table 5), the exact budget
rule against brute force, the curve, and the fail-fast settings checks. No Ray, no models."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from kdlib.errors import ConfigError
from kdlib.tune.config import check_feasible, load_tune_config
from kdlib.tune.search import scored_epochs, space_pairs
from kdlib.tune.selection import Candidate, brute_force_select, budget_select, curve, threshold_select, total_layers

ROOT = Path(__file__).resolve().parent.parent

# flexible-multitask-bert-serving, Table 5 (12-layer BERT): per task the teacher's L (from the "w/o KD"
# row, (12 - L, L)), then the scores of KD-1, KD-2, KD-3 and of the undistilled teacher (l = L).
TABLE5 = {  # task: (L, [KD-1, KD-2, KD-3], w/o KD)
    "QNLI": (10, [86.4, 88.6, 90.2], 91.7), "RTE": (5, [66.1, 64.6, 66.8], 71.5),
    "QQP": (10, [91.0, 91.3, 91.2], 91.1), "MNLI": (8, [77.5, 81.7, 82.9], 84.5),
    "SST-2": (6, [90.7, 92.7, 92.7], 93.1), "MRPC": (5, [85.1, 86.3, 88.0], 89.7),
    "CoLA": (8, [36.4, 44.0, 50.0], 55.2), "STS-B": (8, [88.3, 88.6, 88.9], 88.9),
}
# The paper's chosen (frozen layers, task layers) for c = 1, 2, 3, with the total layers and average.
TABLE5_CHOICES = {
    1.0: ({"QNLI": (2, 3), "RTE": (7, 5), "QQP": (2, 1), "MNLI": (4, 3), "SST-2": (6, 2), "MRPC": (7, 3),
           "CoLA": (4, 8), "STS-B": (4, 1)}, 33, 82.5),
    2.0: ({"QNLI": (2, 2), "RTE": (7, 1), "QQP": (2, 1), "MNLI": (4, 2), "SST-2": (6, 2), "MRPC": (7, 1),
           "CoLA": (4, 3), "STS-B": (4, 1)}, 20, 80.4),
    3.0: ({"QNLI": (2, 1), "RTE": (7, 1), "QQP": (2, 1), "MNLI": (4, 2), "SST-2": (6, 1), "MRPC": (7, 1),
           "CoLA": (4, 3), "STS-B": (4, 1)}, 18, 79.9),
}


def table5_candidates() -> list[Candidate]:
    out = []
    for task, (L, kd, teacher) in TABLE5.items():
        out += [Candidate(task, L, l, s, teacher) for l, s in enumerate(kd, start=1)]
        out.append(Candidate(task, L, L, teacher, teacher, source="teacher"))
    return out


@pytest.mark.parametrize("c", sorted(TABLE5_CHOICES))
def test_threshold_rule_reproduces_paper_table5(c):
    expected, layers, average = TABLE5_CHOICES[c]
    sel = threshold_select(table5_candidates(), c)
    assert {t: (12 - o.L, o.l) for t, o in sel.choice.items()} == expected
    assert sel.total_layers(12) == layers
    assert sel.average() == pytest.approx(average, abs=0.05)  # the paper rounds to one decimal
    assert sel.overhead(12) == pytest.approx(layers / 96)


def test_threshold_rule_picks_L_by_best_teacher_and_stops_below_c():
    cands = [
        Candidate("a", 2, 1, 80.0, 85.0), Candidate("a", 2, 2, 83.0, 85.0),
        Candidate("a", 3, 1, 70.0, 86.0), Candidate("a", 3, 2, 70.5, 86.0), Candidate("a", 3, 3, 74.0, 86.0),
        Candidate("b", 2, 1, 60.0, 61.0), Candidate("b", 4, 1, 60.0, 61.0),  # tie on the teacher: smaller L
    ]
    sel = threshold_select(cands, 1.0)
    # a: L=3 has the best teacher (86 > 85) even though its students are worse; 70 -> 70.5 is +0.5 < 1
    # but 70 -> 74 over two layers is +2/layer >= 1: the ladder jumps to l=3.
    assert (sel.choice["a"].L, sel.choice["a"].l) == (3, 3)
    assert (sel.choice["b"].L, sel.choice["b"].l) == (2, 1)
    assert "best teacher" in sel.reasons["a"] and "points/layer" in sel.reasons["a"]
    assert (threshold_select(cands, 2.5).choice["a"].l) == 1  # +2/layer < 2.5: stays at one layer
    # the gain must be at least c ("no less than"): exactly c grows
    assert threshold_select([Candidate("x", 2, 1, 10.0, 0.0), Candidate("x", 2, 2, 11.0, 0.0)], 1.0).choice["x"].l == 2


def random_candidates(rng: random.Random, tasks: int, n_layers: int) -> list[Candidate]:
    out = []
    for t in range(tasks):
        for L in rng.sample(range(1, n_layers + 1), k=rng.randint(1, 3)):
            for l in range(1, min(3, L) + 1):
                if rng.random() < 0.8:
                    out.append(Candidate(f"t{t}", L, l, rng.uniform(50, 90), 0.0))
        if not any(c.task == f"t{t}" for c in out):
            out.append(Candidate(f"t{t}", n_layers, 1, rng.uniform(50, 90), 0.0))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_budget_rule_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    n_layers = rng.choice([4, 6, 12])
    cands = random_candidates(rng, rng.randint(1, 4), n_layers)
    tasks = {c.task for c in cands}
    for budget in range(1, n_layers * len(tasks) + 2):
        got, want = budget_select(cands, budget, n_layers), brute_force_select(cands, budget, n_layers)
        if want is None:
            assert got is None
            continue
        assert got is not None and set(got.choice) == tasks
        assert got.average() == pytest.approx(want[0], abs=1e-9)
        assert got.total_layers(n_layers) <= budget
        assert got.total_layers(n_layers) == want[1]


def test_budget_rule_counts_the_shared_trunk_once():
    # 6 layers, two tasks: the trunk runs once, as deep as the deepest branch point (4), not 4 + 2.
    cands = [Candidate("a", 2, 1, 80.0, 0.0), Candidate("b", 2, 1, 70.0, 0.0), Candidate("b", 4, 1, 75.0, 0.0)]
    assert total_layers([cands[0], cands[2]], 6) == 4 + 1 + 1
    assert {t: (o.L, o.l) for t, o in budget_select(cands, 6, 6).choice.items()} == {"a": (2, 1), "b": (4, 1)}
    assert budget_select(cands, 5, 6) is None
    # A full-depth pair (no trunk) wins when it is better and fits: 1 + 3 layers.
    more = cands + [Candidate("a", 6, 1, 81.0, 0.0), Candidate("b", 6, 3, 90.0, 0.0)]
    assert {t: (o.L, o.l) for t, o in budget_select(more, 4, 6).choice.items()} == {"a": (6, 1), "b": (6, 3)}


def test_curve_has_a_point_per_threshold_and_feasible_budget():
    points = curve(table5_candidates(), 12, [1.0, 2.0, 3.0], [])
    assert [p["setting"] for p in points if p["rule"] == "threshold"] == [1.0, 2.0, 3.0]
    budgets = [p for p in points if p["rule"] == "budget"]
    assert budgets and all(p["total_layers"] <= p["setting"] for p in budgets)
    # The exact rule is never worse than the threshold rule at the threshold rule's own layer count.
    for c, (_, layers, _) in TABLE5_CHOICES.items():
        assert budget_select(table5_candidates(), layers, 12).average() >= threshold_select(table5_candidates(), c).average() - 1e-9


def search_space(cfg, rng: random.Random) -> list[Candidate]:
    """Every branch a config's search can offer, with random scores: students of l = 1..l_max per L, and the
    undistilled teacher (l = L) when the config includes it."""
    s, out = cfg.search, []
    for task in cfg.tasks:
        for L in range(s.min_fine_tune_layers, s.max_fine_tune_layers + 1):
            teacher = rng.uniform(60, 90)
            out += [Candidate(task, L, l, rng.uniform(50, 90), teacher)
                    for l in range(1, min(s.max_branch_layers, L) + 1)]
            if s.include_teacher:
                out.append(Candidate(task, L, L, teacher, teacher, source="teacher"))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_tune_config_fits_minilm_and_its_selection_settings_all_give_a_choice(path):
    cfg = load_tune_config(path)
    check_feasible(cfg, 6)  # MiniLM's 6 layers
    sel, n_tasks = cfg.selection, len(cfg.tasks)
    cands = search_space(cfg, random.Random(0))
    # check_feasible's promise: the configured budget holds a merged model, whatever the trials score.
    if sel.budget is not None:
        chosen = budget_select(cands, sel.budget, 6)
        assert chosen is not None and set(chosen.choice) == set(cfg.tasks) and chosen.total_layers(6) <= sel.budget
    # The curve has one point per swept threshold and one per budget (every feasible one when none is given:
    # from the shallowest trunk plus one layer per task up to every task's full encoder).
    points = curve(cands, 6, sel.sweep_thresholds, sel.sweep_budgets)
    assert [p["setting"] for p in points if p["rule"] == "threshold"] == sel.sweep_thresholds
    smallest = 6 - cfg.search.max_fine_tune_layers + n_tasks
    budgets = sel.sweep_budgets or list(range(smallest, 6 * n_tasks + 1))
    assert [p["setting"] for p in points if p["rule"] == "budget"] == budgets
    assert all(p["total_layers"] <= p["setting"] and set(p["choice"]) == set(cfg.tasks)
               for p in points if p["rule"] == "budget")


def test_bad_settings_name_file_line_and_key(tmp_path):
    text = (ROOT / "configs" / "tune" / "demo.yaml").read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "max_branch_layers:" in t)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("max_branch_layers: 2", "max_branch_layers: 4"))
    with pytest.raises(ConfigError, match=rf"bad.yaml, line {line}: search.max_branch_layers = 4: .*less than or equal to 3"):
        load_tune_config(bad)
    with pytest.raises(ConfigError, match=r"\(from command line\): search.max_branch_layers = 4"):
        load_tune_config(ROOT / "configs" / "tune" / "demo.yaml", ["search.max_branch_layers=4"])
    with pytest.raises(ConfigError, match="min_fine_tune_layers .5. exceeds"):
        load_tune_config(ROOT / "configs" / "tune" / "demo.yaml", ["search.min_fine_tune_layers=5"])


def test_impossible_settings_fail_fast():
    path = ROOT / "configs" / "tune" / "demo.yaml"
    with pytest.raises(ConfigError, match="max_fine_tune_layers=7: the encoder has only 6 layers"):
        check_feasible(load_tune_config(path, ["search.max_fine_tune_layers=7"]), 6)
    with pytest.raises(ConfigError, match="budget 2 is below one layer per task"):
        check_feasible(load_tune_config(path, ["selection.budget=2"]), 6)
    with pytest.raises(ConfigError, match="cannot hold the smallest merged model"):
        check_feasible(load_tune_config(path, ["selection.sweep_budgets=[5]"]), 6)  # trunk 3 + 3 branches = 6
    check_feasible(load_tune_config(path, ["selection.budget=6"]), 6)


@pytest.mark.parametrize("epochs, grace, factor", [(10, 2, 2.0), (10, 2, 3.0), (4, 1, 3.0), (2, 1, 2.0), (8, 1, 2.0),
                                                   (10, 1, 2.5), (10, 2, 1.5)])
def test_scored_epochs_are_ashas_rungs_and_the_last(epochs, grace, factor):
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=epochs, grace_period=grace,
                         reduction_factor=factor)
    # ASHA decides a rung at the first report whose epoch reaches its milestone (2.5 -> epoch 3)
    rungs = {math.ceil(milestone) for milestone, _ in asha._brackets[0]._rungs}
    assert scored_epochs(epochs, grace, factor) == sorted(rungs | {epochs})


def test_space_pairs_counts_the_depth_space():
    assert space_pairs(2, 5, 3) == 2 + 3 + 3 + 3  # the glue-mini sweep's 11 pairs
    assert space_pairs(4, 10, 3) == 21  # a 12-layer encoder's L in [4, 10] (the paper's setting)


def test_old_student_entries_read_as_one_score_per_epoch():
    from kdlib.tune.trial import epoch_scores

    assert epoch_scores({"scores": [0.5, 0.6, 0.7]}) == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert epoch_scores({"scores": [[2, 0.6], [4, 0.8]]}) == [(2, 0.6), (4, 0.8)]
