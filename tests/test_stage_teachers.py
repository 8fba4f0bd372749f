"""kdlib.pipeline.teachers: one Ray task per task trains its K-member ensemble, keyed so that the pipeline
and the depth search share one ensemble per (task, L, settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlib.artifact import read_manifest
from kdlib.config import TeacherConfig
from kdlib.encoder import EncoderRef
from kdlib.pipeline import RunContext, teacher_key, train_teachers
from kdlib.scoring import member_scores
from kdlib.soft_targets import teacher_logits_array
from kdlib.tune.settings import TrialSettings
from kdlib.tune.trial import teacher_fingerprint


def test_each_task_gets_a_k_member_ensemble_of_its_depth(tiny_pipeline):
    p = tiny_pipeline
    assert set(p.teachers.dirs) == set(p.tasks)
    for name, folder in p.teachers.dirs.items():
        manifest = read_manifest(folder)
        assert manifest["role"] == "teacher_ensemble" and manifest["task"] == name
        L = p.cfg.tasks[name].fine_tune_layers
        assert manifest["fine_tune_layers"] == L and manifest["members"] == p.cfg.teachers.members
        assert [b["depth"] for b in manifest["branches"]] == [4 - L] * p.cfg.teachers.members  # tiny encoder: 4
        key = teacher_key(p.ctx.encoder, p.tasks[name].digest, L, p.cfg.teachers)
        assert p.teachers.key(name) == key and Path(folder).parent.name == key
        for k in range(p.cfg.teachers.members):  # every member as a transformers checkpoint too
            config = json.loads((Path(folder).parent / "checkpoints" / f"{name}__m{k}" / "config.json").read_text())
            assert len(config["id2label"]) == p.tasks[name].num_outputs
    assert any(line.startswith("[teachers:sentiment] done in") for line in p.lines)


def test_a_reused_ensemble_without_checkpoints_gets_them(tiny_pipeline):
    """An ensemble the depth search trained (it writes no checkpoints) is reused by the pipeline, which exports
    its members then; the export equals the one written at training time."""
    import shutil

    p = tiny_pipeline
    folder = Path(p.teachers.dirs["paraphrase"]).parent / "checkpoints"
    before = {f.name: f.read_bytes() for f in (folder / "paraphrase__m0").iterdir()}
    shutil.rmtree(folder)
    train_teachers(p.ctx, p.tasks)
    assert {f.name: f.read_bytes() for f in (folder / "paraphrase__m0").iterdir()} == before


def test_the_ensemble_keeps_every_members_loss_and_dev_score_per_epoch(tiny_pipeline):
    p = tiny_pipeline
    K, epochs = p.cfg.teachers.members, p.cfg.teachers.epochs
    for name, folder in p.teachers.dirs.items():
        saved = json.loads((Path(folder) / "history.json").read_text())
        assert (saved["stage"], saved["task"], saved["metric"]) == ("teachers", name, p.tasks[name].metric)
        assert [r["epoch"] for r in saved["epochs"]] == list(range(1, epochs + 1))
        assert set(saved["epochs"][-1]) == {"epoch"} | {f"{k}/{name}__m{m}" for k in ("loss", "dev") for m in range(K)}
        # the last epoch's dev scores are the finished members': what their soft targets on dev score
        dev = p.labels.dev(name)
        want = member_scores(p.tasks[name].kind, p.tasks[name].metric, dev["label"].to_numpy(), teacher_logits_array(dev))
        assert [saved["epochs"][-1][f"dev/{name}__m{m}"] for m in range(K)] == pytest.approx(want, abs=1e-6)


def test_a_rerun_reuses_every_ensemble_and_trains_nothing(tiny_pipeline):
    p = tiny_pipeline
    lines: list[str] = []
    ctx = RunContext.create(p.cfg, log=lines.append)
    again = train_teachers(ctx, p.tasks)
    assert again == p.teachers
    assert [r.cached for r in ctx.cache.records] == [True] * len(p.tasks)
    assert not any("done in" in line or "running" in line for line in lines)


def test_untaught_tasks_get_no_ensemble(tiny_pipeline):
    p = tiny_pipeline
    cfg = p.cfg.model_copy(deep=True)
    cfg.tasks["similarity"].teacher = False
    lines: list[str] = []
    teachers = train_teachers(RunContext.create(cfg, log=lines.append), p.tasks)
    assert set(teachers.dirs) == {"sentiment", "paraphrase"}
    assert "[teachers:similarity] none (teacher: false): the student learns it from gold labels" in lines


def test_the_key_follows_what_the_ensemble_computes_not_how_it_is_scheduled():
    enc = EncoderRef(name="e", source="e", fingerprint="f", max_length=32)
    base = TeacherConfig()
    key = teacher_key(enc, "digest", 2, base)
    assert teacher_key(enc, "digest", 2, base.model_copy(update={"cpus_per_task": 0.25})) == key
    for changed in (teacher_key(enc, "digest", 3, base), teacher_key(enc, "other", 2, base),
                    teacher_key(enc, "digest", 2, base.model_copy(update={"lr": 1e-4})),
                    teacher_key(enc.model_copy(update={"max_length": 64}), "digest", 2, base),
                    teacher_key(enc, "digest", 2, base, members=1)):
        assert changed != key
    assert teacher_key(enc, "digest", 2, base, members=base.members) == key


def test_the_depth_search_asks_for_the_pipelines_ensemble(tiny_pipeline):
    """A trial's (task, L) teacher is the very artifact the teachers stage trains (the same cache entry)."""
    from kdlib.tune.config import TuneRunConfig

    p = tiny_pipeline
    fields = p.cfg.model_dump(include={"storage_root", "data_dir", "seed", "encoder", "tasks", "teachers"})
    for task in fields["tasks"].values():
        task.pop("augment")  # the depth search labels no masked copies
    tune_cfg = TuneRunConfig(**fields)
    s = TrialSettings.from_config(tune_cfg, p.tasks["sentiment"], p.ctx.encoder, str(p.root), str(p.root / "tune"))
    L = p.cfg.tasks["sentiment"].fine_tune_layers
    assert teacher_fingerprint(s, L) == p.teachers.key("sentiment")
