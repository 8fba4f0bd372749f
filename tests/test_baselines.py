"""kdlib.baselines against hand computations; a chance-level teacher ensemble warns in the console, in
results.md, and with jobs/distill.py --strict in the exit status."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from conftest import tiny_run_overrides
from kdlib.baselines import MARGIN, at_chance, task_baseline
from kdlib.config import load_run_config
from kdlib.pipeline import RunContext, load_data, write_results
from kdlib.pipeline.evaluate import chance_warnings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def test_majority_class_scores_by_hand():
    # train: class 1 is the most frequent (3 of 5); dev has 2 of 4 ones
    three = dict(kind="classification", train_labels=[0, 1, 1, 2, 1], dev_labels=[1, 0, 1, 2], num_classes=3)
    assert task_baseline(metric="accuracy", **three) == {"predictor": "majority", "prediction": 1, "score": 50.0}
    # macro F1 over the classes in predictions or labels {0, 1, 2}: class 1 2*2/(4+2), the others 0
    assert task_baseline(metric="f1", **three)["score"] == pytest.approx(100 * (4 / 6) / 3)
    assert task_baseline(metric="matthews", **three)["score"] == 0.0  # a constant prediction
    # binary F1 is the positive class's: 2*3/(5+3) when the majority is 1, 0 when it is 0
    assert task_baseline(kind="classification", metric="f1", train_labels=[0, 1, 1], dev_labels=[1, 0, 0, 1, 1],
                         num_classes=2)["score"] == pytest.approx(75.0)
    zero = task_baseline(kind="classification", metric="f1", train_labels=[0, 0, 1], dev_labels=[1, 0, 0, 1, 1],
                         num_classes=2)
    assert zero["prediction"] == 0 and zero["score"] == 0.0
    # a tie goes to the lowest class id
    assert task_baseline(kind="classification", metric="accuracy", train_labels=[1, 0], dev_labels=[0, 0, 1],
                         num_classes=2)["score"] == pytest.approx(200 / 3)


def test_the_mean_predictor_correlates_zero():
    for metric in ("pearson", "spearman"):
        base = task_baseline(kind="regression", metric=metric, train_labels=[1.0, 2.0, 3.0, 6.0],
                             dev_labels=[0.5, 4.0, 2.5])
        assert base == {"predictor": "mean", "prediction": 3.0, "score": 0.0}
    with pytest.raises(ValueError, match="training split is empty"):
        task_baseline(kind="regression", metric="pearson", train_labels=[], dev_labels=[1.0])


def test_within_two_points_or_below_is_chance():
    assert MARGIN == 2.0
    assert at_chance(52.0, 50.0) and at_chance(30.0, 50.0) and not at_chance(52.01, 50.0)
    assert at_chance(1.9, 0.0) and not at_chance(2.1, 0.0)  # a correlation: r <= 0.02


def test_a_chance_level_ensemble_is_a_warning_naming_the_task_and_what_to_try(tmp_path):
    cfg = load_run_config(DEMO, tiny_run_overrides(tmp_path))
    lines: list[str] = []
    ctx = RunContext.create(cfg, log=lines.append)
    tasks = load_data(ctx)
    scores = {"sentiment": {"metric": "accuracy", "primary": {"ensemble": 51.5}},
              "paraphrase": {"metric": "f1", "primary": {"ensemble": 70.0}},
              "similarity": {"metric": "pearson", "primary": {"ensemble": 1.0}}}
    baselines = {"sentiment": {"predictor": "majority", "prediction": 1, "score": 50.0},
                 "paraphrase": {"predictor": "majority", "prediction": 0, "score": 0.0},
                 "similarity": {"predictor": "mean", "prediction": 2.5, "score": 0.0}}
    warnings = chance_warnings(ctx, tasks, scores, baselines)
    assert [w.split(":")[0] for w in warnings] == ["task sentiment", "task similarity"]
    sentiment, similarity = warnings
    assert "51.50 dev accuracy" in sentiment and "majority baseline 50.00" in sentiment
    assert "predicting 'positive' for every example" in sentiment
    assert ("teachers.epochs=1" in sentiment and "tasks.sentiment.fine_tune_layers=2, the encoder has 4" in sentiment
            and "teachers.lr=0.0003" in sentiment)
    assert "mean baseline 0.00" in similarity and "training mean 2.5" in similarity
    assert [line for line in lines if line.startswith("[evaluate]")] == [f"[evaluate] WARNING {w}" for w in warnings]


def test_the_tiny_runs_chance_level_teachers_warn_and_strict_exits_3(tiny_pipeline, capsys):
    p = tiny_pipeline
    r = p.results
    # the baselines by hand from the data: the majority training class's share of dev, the mean correlating 0
    for name, data in p.tasks.items():
        base = r.baselines[name]
        if data.kind == "classification":
            majority = int(data.train["label"].value_counts().sort_index().idxmax())
            assert base["prediction"] == majority
            if data.metric == "accuracy":
                assert base["score"] == pytest.approx(100 * (data.dev["label"] == majority).mean())
        else:
            assert base == {"predictor": "mean", "prediction": pytest.approx(data.train["label"].mean()), "score": 0.0}
    chance = [n for n, s in r.scores.items() if s["primary"]["ensemble"] <= r.baselines[n]["score"] + MARGIN]
    # One epoch of teachers on a tiny random encoder: sentiment's ensemble predicts one class.
    assert chance and [w.split(":")[0] for w in r.warnings] == [f"task {n}" for n in chance]
    assert all(any(line == f"[evaluate] WARNING {w}" for line in p.lines) for w in r.warnings)
    write_results(p.ctx, p.results)
    saved = json.loads((p.root / "stages" / "results.json").read_text())
    assert saved["baselines"] == json.loads(json.dumps(r.baselines)) and saved["warnings"] == r.warnings
    md = (p.root / "stages" / "results.md").read_text()
    assert "| task | metric | baseline |" in md and f"- **WARNING** {r.warnings[0]}" in md

    # jobs/distill.py on the same storage root: every stage is reused, evaluate warns again
    main = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")["main"]
    overrides = [o for o in p.overrides if not o.startswith("run_name=")]
    assert main([str(DEMO), *overrides, "run_name=lenient"]) == 0
    assert main([str(DEMO), "--strict", *overrides, "run_name=strict"]) == 3
    printed = capsys.readouterr()
    assert f"[evaluate] WARNING {r.warnings[0]}" in printed.out + printed.err
    assert json.loads((p.root / "strict" / "results.json").read_text())["warnings"] == r.warnings
