"""kdlib.pipeline.labels: every planned example labeled once by every member, into stores that later runs
reuse."""

from __future__ import annotations

import numpy as np

from kdlib.pipeline import RunContext, label_tasks, plan_labels
from kdlib.soft_targets import teacher_logits_array


def test_every_planned_example_is_in_its_store_once_with_every_members_logits(tiny_pipeline):
    p = tiny_pipeline
    assert set(p.labels.stores) == set(p.tasks) and p.labels.complete()
    for name, store in p.labels.stores.items():
        planned = [i for _, ex in p.labels.shards(task=name) for i in ex["id"]]
        rows = store.read()
        assert sorted(rows["id"]) == sorted(planned) and rows["id"].is_unique
        logits = teacher_logits_array(rows)  # (N, K, C)
        assert logits.shape[:2] == (len(rows), p.cfg.teachers.members) and np.isfinite(logits).all()
        assert logits.shape[2] == p.tasks[name].num_outputs
        # sentiment: 2 masked copies of each of its 100 training rows (configs/demo.yaml)
        augmented = 200 if name == "sentiment" else 0
        assert rows["split"].value_counts().to_dict() == {"dev": len(p.tasks[name].dev), "train": 100 + augmented}
    dev = p.labels.dev("paraphrase")
    assert dev["split"].eq("dev").all() and len(dev) == len(p.tasks["paraphrase"].dev)


def test_the_store_key_names_the_teachers_and_a_rerun_labels_nothing(tiny_pipeline):
    p = tiny_pipeline
    lines: list[str] = []
    ctx = RunContext.create(p.cfg, log=lines.append)
    labels = plan_labels(ctx, p.tasks, p.teachers)
    assert {n: s.key for n, s in labels.stores.items()} == {n: s.key for n, s in p.labels.stores.items()}
    label_tasks(ctx, labels, p.teachers)
    assert [(r.name, r.cached) for r in ctx.cache.records] == [("labels", True)] * len(p.tasks)
    assert not any(line.startswith("[labels]") for line in lines)  # no labeling pass was planned
    # other teachers make another store
    other = p.teachers.__class__({**p.teachers.dirs, "sentiment": p.teachers.dirs["sentiment"].replace(
        p.teachers.key("sentiment"), "0" * 16)})
    assert plan_labels(ctx, p.tasks, other).stores["sentiment"].key != labels.stores["sentiment"].key
