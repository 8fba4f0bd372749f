"""kdlib.pipeline.distill: the TrainSpec the workers get, what they trained on, and the students they leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlib.artifact import read_manifest
from kdlib.errors import ConfigError
from kdlib.pipeline.distill import TRAIN_SPEC, check_stream_fits, train_spec
from kdlib.scoring import member_scores
from kdlib.soft_targets import ids_digest, teacher_logits_array
from kdlib.train_spec import TrainSpec


def test_the_workers_trained_on_every_stored_training_row_once(tiny_pipeline):
    p = tiny_pipeline
    stage = Path(p.students.stage_dir)
    report = json.loads((stage / "train_report.json").read_text())
    for name, store in p.labels.stores.items():
        ids = sorted(store.read(split="train")["id"])
        assert report[f"rows/{name}"] == len(ids) and report[f"duplicates/{name}"] == 0
        assert report[f"ids/{name}"] == ids_digest(ids)
    assert report["epoch"] == p.cfg.distill.epochs and report["placement/nodes"]


def test_the_saved_spec_is_what_the_workers_trained_with(tiny_pipeline):
    p = tiny_pipeline
    saved = TrainSpec.model_validate_json((Path(p.students.stage_dir) / TRAIN_SPEC).read_text())
    assert saved == train_spec(p.ctx, p.tasks, p.labels, p.teachers)
    assert saved.encoder == p.ctx.encoder and saved.lr == p.cfg.distill.lr and saved.student.kind == "branched"
    for name, t in saved.tasks.items():
        # each branch starts from the ensemble member with the best dev score
        dev = p.labels.dev(name)
        scores = member_scores(p.tasks[name].kind, p.tasks[name].metric, dev["label"].to_numpy(),
                               teacher_logits_array(dev))
        assert t.init_member == f"{name}__m{scores.index(max(scores))}"
        assert t.ensemble_dir == p.teachers.dirs[name] and t.objective == p.cfg.distill.objective


def test_one_trunkless_student_per_task(tiny_pipeline):
    p = tiny_pipeline
    for name in p.tasks:
        manifest = read_manifest(Path(p.students.dir) / name)
        assert manifest["role"] == "student" and list(manifest["tasks"]) == [name]
        assert [b["layers"] for b in manifest["branches"]] == [p.cfg.tasks[name].branch_layers]


def test_the_spec_key_ignores_where_the_teachers_live_but_not_what_trains(tiny_pipeline):
    p = tiny_pipeline
    spec = train_spec(p.ctx, p.tasks, p.labels, p.teachers)
    moved = spec.model_copy(update={"tasks": {n: t.model_copy(update={"ensemble_dir": "s3://elsewhere"})
                                              for n, t in spec.tasks.items()}})
    assert moved.key() == spec.key()
    assert spec.model_copy(update={"lr": spec.lr * 2}).key() != spec.key()
    with pytest.raises(ValueError):  # validated: a typo'd field or a bad value is refused
        TrainSpec.model_validate({**spec.model_dump(), "learning_rate": 1.0})


def test_streaming_that_does_not_fit_the_cluster_is_refused_up_front(tiny_pipeline):
    cfg = tiny_pipeline.cfg.model_copy(deep=True)
    cfg.labeling.num_actors, cfg.labeling.cpus_per_actor = 4, 1.0
    with pytest.raises(ConfigError, match=r"labeling\.cpus_per_actor / distill\.cpus_per_worker"):
        check_stream_fits(cfg)
