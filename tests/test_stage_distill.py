"""kdlib.pipeline.distill: the TrainSpec the workers get, what they trained on, and the students they leave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib.artifact import read_manifest
from kdlib.dev_scoring import dev_features, dev_metrics, dev_outputs, share_bounds
from kdlib.errors import ConfigError
from kdlib.metrics import task_metrics
from kdlib.optim import Optimization
from kdlib.pipeline.distill import HISTORY, TRAIN_SPEC, check_stream_fits, dev_rows, train_spec, training_datasets
from kdlib.predict import predict
from kdlib.scoring import member_scores
from kdlib.soft_targets import ids_digest, teacher_logits_array
from kdlib.train_loop import TaskRows, ingest, load_trained_student, run_distillation, run_epochs
from kdlib.train_spec import TrainSpec
from kdlib.trainees import make_trainee


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


def hand_dev_scores(model, p) -> dict[str, float]:
    """Each task's primary dev score of a trained branched student (trunk included), by kdlib.predict."""
    tok = p.ctx.encoder.tokenizer()
    out = {}
    for name, data in p.tasks.items():
        dev = data.dev
        outputs = predict(model, tok, dev["text"].tolist(), dev["text_pair"].tolist(), [name], max_length=32)[name]
        out[f"dev/{name}"] = task_metrics(data.kind, outputs, dev["label"].to_numpy())[data.metric]
    return out


def test_the_stage_keeps_every_epochs_losses_lr_and_dev_scores(tiny_pipeline):
    p = tiny_pipeline
    saved = json.loads((Path(p.students.stage_dir) / HISTORY).read_text())
    assert saved["stage"] == "distill" and [r["epoch"] for r in saved["epochs"]] == [1]
    last = saved["epochs"][-1]
    assert set(last) == {"epoch", "step", "seconds", "lr"} | {f"{k}/{t}" for k in ("loss", "dev") for t in p.tasks}
    for name in p.tasks:  # the last epoch's weights are the student evaluate scores (merged onto one trunk)
        assert last[f"dev/{name}"] == pytest.approx(p.results.scores[name]["primary"]["student"], abs=1e-6)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8])
def test_the_dev_shares_cover_the_rows_in_rank_order(n):
    for world in (1, 2, 3):
        cuts = [share_bounds(n, rank, world) for rank in range(world)]
        assert [list(range(lo, hi)) for lo, hi in cuts] == [list(a) for a in np.array_split(np.arange(n), world)]


def test_scoring_dev_every_epoch_leaves_the_training_unchanged(tiny_pipeline):
    """The same two epochs with and without the dev score between them: the same weights (scoring draws
    nothing from the RNG that the branches' dropout uses, and leaves no gradient), and the scores are the
    trained student's."""
    p = tiny_pipeline
    spec = train_spec(p.ctx, p.tasks, p.labels, p.teachers).model_copy(update={"epochs": 2})
    dev = dev_rows(p.tasks)
    trainee = make_trainee(spec)
    rows = {t: TaskRows() for t in spec.tasks}
    for ds in training_datasets(p.labels, {}).values():
        ingest(ds, trainee, rows, max_length=spec.max_length)
    data = {t: rows[t].tensors(trainee) for t in spec.tasks}  # frozen-trunk states: the same for both runs

    def train(scored: bool):
        torch.manual_seed(7)
        trainee = make_trainee(spec)
        opt = Optimization([q for q in trainee.model.parameters() if q.requires_grad], lr=spec.lr,
                           weight_decay=spec.weight_decay, schedule=spec.lr_schedule)
        feats = dev_features(dev, trainee, rank=0, world=1, max_length=spec.max_length)
        epochs = []
        run_epochs(trainee, data, spec, opt, on_epoch=epochs.append,
                   score=(lambda: dev_metrics(dev_outputs(trainee, spec.tasks, feats), dev, spec.tasks)) if scored
                   else None)
        return trainee, epochs

    scored, with_dev = train(True)
    _, without = train(False)
    assert [e["replicas/digests"] for e in with_dev] == [e["replicas/digests"] for e in without]
    assert [e["loss/sentiment"] for e in with_dev] == [e["loss/sentiment"] for e in without]
    assert with_dev[0]["replicas/digests"] != with_dev[1]["replicas/digests"]  # the second epoch trained on
    assert not any(k.startswith("dev/") for k in without[-1])
    hand = hand_dev_scores(scored.model, p)
    assert {k: v for k, v in with_dev[-1].items() if k.startswith("dev/")} == pytest.approx(hand, abs=1e-6)


def test_two_workers_score_their_dev_shares_as_one(tiny_pipeline, tmp_path):
    """Each worker scores its share of dev; the gathered outputs score the trained student, on every rank alike;
    the driver gets every epoch's metrics as the run's return value."""
    p = tiny_pipeline
    spec = train_spec(p.ctx, p.tasks, p.labels, p.teachers).model_copy(update={"epochs": 2})
    result = run_distillation(datasets=training_datasets(p.labels, {}), spec=spec, num_workers=2,
                              cpus_per_worker=0.5, max_failures=0, storage_path=str(tmp_path), name="dev",
                              dev=dev_rows(p.tasks))
    history = result.return_value
    assert [r["epoch"] for r in history] == [1, 2] and result.metrics["replicas/identical"]
    hand = hand_dev_scores(load_trained_student(result.checkpoint, spec), p)
    for key, score in hand.items():
        assert history[-1][key] == pytest.approx(score, abs=1e-6) and result.metrics[key] == history[-1][key]
        assert np.isfinite(history[0][key])
