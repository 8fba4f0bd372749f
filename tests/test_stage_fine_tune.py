"""kdlib.pipeline.fine_tune (MKD sec. 6.2): its own stage, started from the distill stage's last checkpoint,
keyed by that distillation and its own settings."""

from __future__ import annotations

import json
from pathlib import Path

from kdlib.pipeline import RunContext, fine_tune
from kdlib.pipeline.distill import TRAIN_SPEC
from kdlib.train_spec import TrainSpec


def test_fine_tuning_continues_the_distilled_spec_and_is_reused(tiny_pipeline):
    p = tiny_pipeline
    cfg = p.cfg.model_copy(deep=True)
    cfg.distill.fine_tune_epochs, cfg.distill.fine_tune_lr = 1, 2e-5
    ctx = RunContext.create(cfg, log=lambda *_: None)
    tuned = fine_tune(ctx, p.tasks, p.labels, p.students)
    stage = Path(tuned.stage_dir)
    spec = TrainSpec.model_validate_json((stage / TRAIN_SPEC).read_text())
    distilled = TrainSpec.model_validate_json((Path(p.students.stage_dir) / TRAIN_SPEC).read_text())
    assert spec == distilled.model_copy(update={"epochs": 1, "lr": 2e-5, "schedule": "mtdnn", "per_task": True})
    report = json.loads((stage / "train_report.json").read_text())
    assert report["epoch"] == 1 and all(report[f"duplicates/{t}"] == 0 for t in p.tasks)
    assert sorted(x.name for x in Path(tuned.dir).iterdir()) == sorted(p.tasks)
    history = json.loads((stage / "history.json").read_text())
    assert history["stage"] == "fine_tune" and [r["epoch"] for r in history["epochs"]] == [1]
    assert all(0 <= history["epochs"][0][f"dev/{t}"] <= 100 or p.tasks[t].kind == "regression" for t in p.tasks)
    # the same settings again: reused; another lr: a new stage from the same distillation
    again = RunContext.create(cfg, log=lambda *_: None)
    assert fine_tune(again, p.tasks, p.labels, p.students) == tuned and again.cache.records[0].cached
