"""The real jobs/distill.py on a tiny random encoder and trimmed demo data, under the session's 2-CPU Ray."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import kill_once_when, tiny_run_overrides
from kdlib.artifact import load_model, read_manifest
from kdlib.config import load_run_config
from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.soft_targets import SoftTargetStore, ids_digest, teacher_logits_array
from kdlib.metrics import task_metrics
from kdlib.pipeline import RunContext, distill_students, label_tasks, load_data, plan_labels, train_teachers
from kdlib.predict import predict, predict_student
from kdlib.students.artifact import load_student

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job():
    return runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")


@pytest.fixture(scope="module")
def tiny_run(ray_session, job, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    overrides = tiny_run_overrides(root)
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    return root, overrides


def test_run_writes_results_config_and_merged_model(tiny_run):
    root, overrides = tiny_run
    run_dir = root / "demo"
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["scores"]) == {"sentiment", "paraphrase", "similarity"}
    for task, s in results["scores"].items():
        assert len(s["primary"]["members"]) == 2  # K = 2 teachers each
        assert np.isfinite(s["primary"]["student"])
    # Tiny encoder has 4 layers; sentiment L=2, l=2 and similarity L=2, l=1 branch at depth 2;
    # paraphrase L=3 -> depth 1, l=2.
    assert results["layers"] == {"trunk": 2, "branches": {"sentiment": 2, "paraphrase": 2, "similarity": 1},
                                 "encoder": 4}
    assert results["overhead"] == pytest.approx((2 + 2 + 2 + 1) / (4 * 3))
    # Both Ray Train workers follow one task schedule and average gradients: their replicas stay identical.
    distilled = Path(next(s["path"] for s in results["stages"] if s["name"] == "distill"))
    report = json.loads((distilled / "train_report.json").read_text())
    assert len(report["replicas/digests"]) == 2 and report["replicas/identical"], report
    assert "| sentiment | accuracy |" in (run_dir / "results.md").read_text()
    # Where each stage ran: the teachers' Ray tasks, the labeling actors' shards, the 2 train workers.
    where = {(s["name"], Path(s["path"]).parent.name if s["name"] == "labels" else ""): s["where"] for s in results["stages"]}
    assert all(re.fullmatch(r"[0-9.]+", w) for (n, _), w in where.items() if n == "teachers"), where
    assert where[("labels", "sentiment")].endswith("(5 shards)"), where  # dev 256 + 44, train 256 + 256 + 88
    assert where[("distill", "")].endswith("(2 train workers)") and where[("merge", "")].startswith("driver")
    assert "| distill |" in (run_dir / "results.md").read_text().split("## Stages")[1]
    # The saved config is exactly what ran.
    saved = load_run_config(run_dir / "config.yaml")
    assert saved == load_run_config(ROOT / "configs" / "demo.yaml", overrides)
    manifest = read_manifest(results["model_dir"])
    assert manifest["role"] == "merged" and manifest["tasks"]["sentiment"]["label_names"] == ["negative", "positive"]
    assert {b["name"]: b["depth"] for b in manifest["branches"]} == {"sentiment": 2, "paraphrase": 1, "similarity": 2}


def test_labels_cover_every_example_exactly_once(tiny_run):
    root, _ = tiny_run
    results = json.loads((root / "demo" / "results.json").read_text())
    label_stages = {Path(s["path"]).parent.name: s for s in results["stages"] if s["name"] == "labels"}
    assert set(label_stages) == {"sentiment", "paraphrase", "similarity"}
    for task, stage in label_stages.items():
        store = SoftTargetStore(str(root), task, stage["fingerprint"])
        rows = store.read()
        assert rows["id"].is_unique
        # sentiment: 2 masked copies of each of its 200 training rows, teacher targets only.
        augmented = 400 if task == "sentiment" else 0
        assert rows["split"].value_counts().to_dict() == {"dev": 300, "train": 200 + augmented}
        assert (rows["source"] == "augmented").sum() == augmented
        assert rows.loc[rows["source"] == "augmented", "label"].isna().all()
        assert rows.loc[rows["source"] == "original", "label"].notna().all()
        assert len(rows["teacher_logits"].iloc[0]) == 2  # K members, each with C outputs


def test_merged_model_matches_each_students_artifact(tiny_run):
    root, overrides = tiny_run
    results = json.loads((root / "demo" / "results.json").read_text())
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", overrides)
    source = resolve_encoder_path(cfg.encoder.name)
    encoder = load_encoder(source, True, cfg.encoder.config_overrides, seed=cfg.seed)
    merged, _ = load_model(results["model_dir"])
    students_dir = Path(next(s["path"] for s in results["stages"] if s["name"] == "distill")) / "students"
    tok = load_tokenizer(source)
    texts, pairs = ["a fine film", "not good at all"], ["it was fine", "bad"]
    for task in ("sentiment", "paraphrase"):
        student, _ = load_model(students_dir / task, encoder=encoder)
        p = None if task == "sentiment" else pairs
        a = predict(merged, tok, texts, p, [task], max_length=32)[task]
        b = predict(student, tok, texts, p, [task], max_length=32)[task]
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rerun_reuses_every_stage(tiny_run, job, capsys):
    root, overrides = tiny_run
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    results = json.loads((root / "demo" / "results.json").read_text())
    assert all(s["cached"] for s in results["stages"]), results["stages"]
    assert "inputs unchanged" in capsys.readouterr().out


def test_a_third_masked_copy_labels_only_the_shards_it_adds(tiny_run, job, capsys):
    """More masked copies make a new store version; the shards whose examples the first run's version holds
    (dev, train and the first two copies, which come out the same) are carried over with its logits, and
    only shards with a third copy's row go to the teachers. The other tasks' stores are reused whole."""
    root, overrides = tiny_run
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", [*overrides, "tasks.sentiment.augment.copies=3"])
    ctx = RunContext.create(cfg)
    tasks = load_data(ctx)
    teachers = train_teachers(ctx, tasks)
    labels = plan_labels(ctx, tasks, teachers)
    stores, plan, cache = labels.stores, labels.plan, ctx.cache
    capsys.readouterr()
    label_tasks(ctx, labels, teachers)
    out = capsys.readouterr().out
    mine = [(s, ex) for s, ex in plan if s.task == "sentiment"]
    fresh = [s for s, ex in mine if ex["id"].str.endswith("~m2").any()]
    assert 0 < len(fresh) < len(mine)
    carried_rows = sum(s.rows for s, _ in mine) - sum(s.rows for s in fresh)
    assert f"[labels:sentiment] {carried_rows} examples ({len(mine) - len(fresh)} shards) carried over" in out
    assert f"labeling {len(fresh)} ({sum(s.rows for s in fresh)} examples)" in out
    assert all(s.cached for s in cache.records if s.name == "labels" and s.path != stores["sentiment"].location)
    first = json.loads((root / "demo" / "results.json").read_text())
    key = next(s["fingerprint"] for s in first["stages"] if s["name"] == "labels" and Path(s["path"]).parent.name == "sentiment")
    old = SoftTargetStore(str(root), "sentiment", key).read().set_index("id")
    new = stores["sentiment"].read().set_index("id")
    assert len(new) == len(old) + 200 and new.index.is_unique
    carried_ids = [i for s, ex in mine if s not in fresh for i in ex["id"]]
    np.testing.assert_array_equal(teacher_logits_array(new.loc[carried_ids].reset_index()),
                                  teacher_logits_array(old.loc[carried_ids].reset_index()))  # copied, bit for bit
    np.testing.assert_allclose(teacher_logits_array(new.loc[old.index].reset_index()),
                               teacher_logits_array(old.reset_index()), atol=1e-5)  # relabeled ones agree too


def test_bad_override_fails_fast_with_the_key(job, capsys, tmp_path):
    code = job["main"]([str(ROOT / "configs" / "demo.yaml"), f"storage_root={tmp_path}", "distill.alpha=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "distill.alpha" in err and "(from command line)" in err and "less than or equal to 1" in err


def test_killed_train_worker_resumes_from_last_checkpoint(tiny_run, job, ray_session):
    """SIGKILL one Ray Train worker once a checkpoint is registered: the run restarts its workers from that
    checkpoint (FailureConfig), not from epoch 0, and finishes."""
    import glob

    root, overrides = tiny_run
    # Also the other schedule and objectives: ROaD's k = 2 tasks per step, teacher annealing (its step
    # counter restored from the checkpoint), MT-DNN soft cross-entropy and MKD's MSE on logits.
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", overrides + [
        "distill.epochs=25", "distill.max_failures=1", "distill.schedule=road", "distill.road_k=2",
        "distill.teacher_annealing=true", "tasks.paraphrase.objective=soft_ce", "tasks.sentiment.objective=mse_logits"])
    snapshots = str(root / "cache" / "distill" / "*" / "ray_train" / "distill" / "checkpoint_manager_snapshot.json")
    before = set(glob.glob(snapshots))

    def registered_checkpoint() -> bool:
        # The controller writes this snapshot once it has registered a reported checkpoint; killing a
        # worker before that would rightly restart from scratch.
        for path in set(glob.glob(snapshots)) - before:
            try:
                if json.loads(Path(path).read_text()).get("latest_checkpoint_result"):
                    return True
            except (OSError, ValueError):  # being written
                pass
        return False

    killer, killed = kill_once_when(registered_checkpoint, "ray::RayTrainWorker", poll=0.2)
    ctx = RunContext.create(cfg)
    tasks = load_data(ctx)
    teachers = train_teachers(ctx, tasks)
    labels = plan_labels(ctx, tasks, teachers)
    label_tasks(ctx, labels, teachers)
    assert all(r.cached for r in ctx.cache.records)  # teachers and labels reused from the first run
    students = Path(distill_students(ctx, tasks, labels, teachers).dir)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    last = sorted(glob.glob(str(students.parent / "ray_train" / "distill" / "checkpoint_2*")))[-1]
    meta = json.loads((Path(last) / "train_state.json").read_text())
    assert meta["epoch"] == 25
    assert meta["starts"][0] == 0 and len(meta["starts"]) == 2 and meta["starts"][1] >= 1, meta
    for task in tasks:
        assert (students / task / "weights.safetensors").exists()
    report = json.loads((students.parent / "train_report.json").read_text())
    assert report["replicas/identical"], report  # the restarted replicas stayed in step


def test_cmow_student_distils_on_ray_train_then_fine_tunes_per_task(tiny_run, job):
    """student.kind=cmow trains end to end on the same stores (teachers and labels reused), then MKD's
    per-task fine-tuning gives every task its own copy; the saved copies reproduce the reported scores.
    similarity has no teacher here (teacher: false): no teacher stage, no labels, gold labels only; and it
    learns its 0-5 score as 26 classes over bins of 0.2 (CMOW paper IV-B), predicting the expected score.
    Its 201 rows reach the 2 workers whole (Ray Train's default split would have dropped one)."""
    root, overrides = tiny_run
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides, "run_name=cmow", "student.kind=cmow",
                        "student.matrix_dim=4", "student.cbow_dim=16", "student.head_hidden=16",
                        "distill.fine_tune_epochs=1", "distill.lr_schedule=linear", "tasks.similarity.teacher=false",
                        "tasks.similarity.bins=[0, 5, 0.2]", "tasks.similarity.max_train_examples=201"]) == 0
    results = json.loads((root / "cmow" / "results.json").read_text())
    taught = [s for s in results["stages"] if s["name"] in ("teachers", "labels")]
    assert len(taught) == 4 and all(s["cached"] for s in taught)  # sentiment's and paraphrase's, reused
    assert not any(Path(s["path"]).parent.name == "similarity" for s in taught if s["name"] == "labels")
    assert results["scores"]["similarity"]["primary"]["members"] == []
    assert results["scores"]["similarity"]["primary"]["ensemble"] is None
    assert results["student"] == "cmow" and results["overhead"] is None
    assert results["parameters"]["total"] > results["parameters"]["without_embeddings"] > 0
    stage = {s["name"]: s for s in results["stages"] if s["name"] in ("distill", "fine_tune")}
    distilled, tuned = Path(stage["distill"]["path"]), Path(stage["fine_tune"]["path"])
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", overrides)
    for stage_dir, base_lr in ((distilled, cfg.distill.lr), (tuned, cfg.distill.fine_tune_lr)):
        seen = json.loads((stage_dir / "train_report.json").read_text())
        assert len(seen["replicas/digests"]) == 2 and seen["replicas/identical"], (stage_dir, seen)
        # lr_schedule linear, in both runs over their own steps: the last step ran at base / total steps
        assert seen["lr"] == pytest.approx(base_lr / seen["step"], rel=1e-9) and seen["step"] > 1
        assert seen["rows/sentiment"] == 600 and seen["rows/similarity"] == 201 and seen["duplicates/similarity"] == 0
    tok = load_tokenizer(resolve_encoder_path(cfg.encoder.name))
    first = json.loads((root / "demo" / "results.json").read_text())
    final = json.loads((distilled / "final_checkpoint.json").read_text())["checkpoint"]  # where fine-tuning started
    assert json.loads((distilled / "ray_train" / final / "train_state.json").read_text())["epoch"] == cfg.distill.epochs
    copies = {}
    for task, score in results["scores"].items():
        copies[task], manifest = load_student(tuned / "students" / task)
        assert manifest["format"] == "kdlib.student/1" and list(manifest["tasks"]) == [task]
        assert copies[task].tasks["similarity"].num_outputs == 26
        key = next(s["fingerprint"] for s in first["stages"] if s["name"] == "labels" and Path(s["path"]).parent.name == task)
        dev = SoftTargetStore(str(root), task, key).read(split="dev")  # the first run's store: the same dev rows
        out = predict_student(copies[task], tok, dev["text"].tolist(), dev["text_pair"].tolist(), [task],
                              max_length=cfg.encoder.max_length)[task]
        kind = "regression" if task == "similarity" else "classification"
        assert task_metrics(kind, out, dev["label"].to_numpy())[score["metric"]] == pytest.approx(
            score["primary"]["student"], abs=1e-6)
    # Each copy was fine-tuned on its own task: the shared encoders drifted apart.
    assert not torch.equal(copies["sentiment"].encoder.cbow.weight, copies["paraphrase"].encoder.cbow.weight)
    # Fine-tuning is its own stage: other fine-tuning settings reuse the multi-task distillation.
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides, "run_name=cmow_lr", "student.kind=cmow",
                        "student.matrix_dim=4", "student.cbow_dim=16", "student.head_hidden=16",
                        "distill.fine_tune_epochs=1", "distill.fine_tune_lr=1e-4", "distill.lr_schedule=linear",
                        "tasks.similarity.teacher=false", "tasks.similarity.bins=[0, 5, 0.2]",
                        "tasks.similarity.max_train_examples=201"]) == 0
    again = {s["name"]: s for s in json.loads((root / "cmow_lr" / "results.json").read_text())["stages"]}
    assert again["distill"]["cached"] and again["distill"]["path"] == stage["distill"]["path"]
    assert not again["fine_tune"]["cached"] and again["fine_tune"]["path"] != stage["fine_tune"]["path"]


def test_streamed_run_sees_the_same_rows_as_a_store_read_run(tiny_run, job):
    """labeling.stream: Ray Train consumes the training shards while they are labeled and committed; its
    workers see exactly the rows a run reading the finished store sees, and the store ends up the same.
    Last in this module: it replaces the first run's store and students."""
    import shutil

    root, overrides = tiny_run
    first = json.loads((root / "demo" / "results.json").read_text())
    read_run = Path(next(s["path"] for s in first["stages"] if s["name"] == "distill"))
    stored = {Path(s["path"]).parent.name: SoftTargetStore(str(root), Path(s["path"]).parent.name, s["fingerprint"]).read()
              for s in first["stages"] if s["name"] == "labels"}
    read_seen = json.loads((read_run / "train_report.json").read_text())
    shutil.rmtree(root / "soft_targets")
    shutil.rmtree(read_run)  # so that distillation runs again, now streamed
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides, "run_name=streamed", "labeling.stream=true",
                        "labeling.num_actors=1"]) == 0
    streamed = json.loads((root / "streamed" / "results.json").read_text())
    stream_run = Path(next(s["path"] for s in streamed["stages"] if s["name"] == "distill"))
    assert stream_run == read_run  # same inputs, same fingerprint: a later run reuses either
    seen = json.loads((stream_run / "train_report.json").read_text())
    rows_keys = [k for k in seen if k.split("/")[0] in ("rows", "duplicates", "ids")]
    assert {k: seen[k] for k in rows_keys} == {k: read_seen[k] for k in rows_keys}
    assert seen["replicas/identical"]
    for task, rows in stored.items():
        train_ids = sorted(rows.loc[rows["split"] == "train", "id"])
        assert seen[f"rows/{task}"] == len(train_ids) and seen[f"duplicates/{task}"] == 0
        assert seen[f"ids/{task}"] == ids_digest(train_ids)
    for s in streamed["stages"]:
        if s["name"] == "labels":
            task = Path(s["path"]).parent.name
            again = SoftTargetStore(str(root), task, s["fingerprint"]).read()
            pd.testing.assert_frame_equal(again, stored[task])  # the streamed run committed the same store
