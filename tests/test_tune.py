"""The real jobs/tune_depth.py on a tiny random encoder and trimmed demo data, under the session's 2-CPU Ray:
sweep results and the failing trial, cache hits, the merged model against each task's own branch, the
report, a rerun that resumes, a killed sweep that resumes, and the fail-fast messages."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_ENCODER

from kdlib.artifact import load_model
from kdlib.encoder import EncoderRef, load_tokenizer, resolve_encoder_path
from kdlib.pipeline.data import load_tasks
from kdlib.tokenize import tokenize
from kdlib.tune.caches import computed_entries
from kdlib.tune.settings import TrialSettings

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
FAIL = "sentiment:3:2"


def tiny_config(tmp_path: Path, tasks=("sentiment", "similarity")) -> str:
    """configs/tune/demo.yaml with only `tasks`, written next to the test's storage."""
    data = yaml.safe_load((ROOT / "configs" / "tune" / "demo.yaml").read_text())
    data["tasks"] = {t: c for t, c in data["tasks"].items() if t in tasks}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def tiny_overrides(root: Path, tasks=("sentiment", "similarity")) -> list[str]:
    enc = ", ".join(f"{k}: {v}" for k, v in TINY_ENCODER.items())
    return [f"storage_root={root}", "encoder.random_init=true", f"encoder.config_overrides={{{enc}}}",
            "encoder.max_length=32", *[f"tasks.{t}.max_train_examples=80" for t in tasks],
            "teachers.epochs=1", "student.epochs=2", "scheduler.grace_period=1", "search.sampler=brute_force",
            "search.min_fine_tune_layers=2", "search.max_fine_tune_layers=3", "search.max_branch_layers=2",
            "search.num_samples=5", "reference.full_fine_tuning=false"]


@pytest.fixture(scope="module")
def job():
    return runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")


@pytest.fixture(scope="module")
def sweep(ray_session, job, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    # every trial asks for half of one of the session Ray's 2 logical GPUs (and runs on the CPU: no CUDA here)
    config, overrides = tiny_config(root), tiny_overrides(root) + [f"search.inject_failures=['{FAIL}']",
                                                                   "search.gpus_per_trial=0.5"]
    assert job["main"]([config, *overrides]) == 0
    out = root / "tune_demo" / "tune"
    return root, config, overrides, json.loads((out / "results.json").read_text()), out


def test_every_task_has_a_table_and_the_failing_trial_is_reported(sweep):
    _, _, _, results, out = sweep
    import pandas as pd

    table = pd.read_csv(out / "table.csv")
    assert set(table["task"]) == {"sentiment", "similarity"}
    # brute force over L in {2, 3} x l in {1, 2}: every pair tried per task (a 5th sample may repeat one)
    for task, g in table.groupby("task"):
        assert {(int(r.L), int(r.l)) for r in g.itertuples()} == {(2, 1), (2, 2), (3, 1), (3, 2)}
    failed = table[table["status"] == "error"]
    assert [(r.task, r.L, r.l) for r in failed.itertuples()] == [("sentiment", 3, 2)]
    assert "injected failure" in failed["error"].iloc[0]
    ok = table[table["status"] == "ok"]
    assert ok["score"].notna().all() and (ok["epochs"] >= 1).all()
    # every trial got the GPU share search.gpus_per_trial asked Ray for, and ran where it found no CUDA: the CPU
    assert (ok["gpus"] == 0.5).all() and (ok["device"] == "cpu").all(), ok[["gpus", "device"]]
    assert results["failed_trials"][0]["l"] == 2
    assert "failed: sentiment L=3 l=2" in (out / "summary.md").read_text()


def test_every_branch_a_selection_uses_is_fully_trained(sweep):
    """ASHA stops weak trials after grace_period epochs; a stopped (L, l) that the rules or the curve choose is
    trained to its last epoch before anything is selected, so no half-trained branch is compared or merged."""
    import pandas as pd

    _, _, _, results, out = sweep
    table = pd.read_csv(out / "table.csv")
    ok = table[table["status"] == "ok"]
    full = {(r.task, r.L, r.l) for r in ok.itertuples() if r.epochs == 2 and not r.stopped_early}
    used = {(t, c["L"], c["l"]) for t, c in results["choice"].items() if c["source"] == "student"}
    for point in results["curve"]:
        used |= {(t, L, l) for t, (L, l, source) in point["choice"].items() if source == "student"}
    assert used and used <= full, (used - full, table)
    finished = ok[ok["finished_after_stop"]]
    assert (finished["epochs"] == 2).all() and not finished["stopped_early"].any()
    # The run stopped some trials early (grace period 1 of 2 epochs), and those a selection used were finished.
    assert (ok["stopped_early"] | ok["finished_after_stop"]).any(), table


def test_trunk_states_and_teachers_are_computed_once(sweep):
    root, _, _, results, out = sweep
    table = pd.read_csv(out / "table.csv")
    assert not table["computed_teacher"].fillna(False).astype(bool).any()  # all prepared before the trials
    states = computed_entries(root, "trunk_states")
    # one computation per (task, depth): depths 2 (L=2) and 1 (L=3) for both tasks
    assert len(states) == 4 and len({s["entry"] for s in states}) == 4
    teachers = computed_entries(root, "teacher")
    assert sorted((t["task"], t["L"]) for t in teachers) == [("sentiment", 2), ("sentiment", 3),
                                                              ("similarity", 2), ("similarity", 3)]
    outputs = computed_entries(root, "teacher_outputs")  # teacher logits on train/dev: once per (task, L)
    assert len(outputs) == 4 and len({o["entry"] for o in outputs}) == 4
    students = computed_entries(root, "student")
    assert len({s["entry"] for s in students}) == len(students)  # no (L, l) trained twice
    assert len(students) >= 2  # at least the trials ASHA let finish
    passes = results["layer_passes"]
    assert passes["uncached"] > passes["cached"] > 0


def test_merged_model_equals_each_tasks_branch(sweep):
    results = sweep[3]
    assert max(results["max_output_difference"].values()) <= 1e-5
    merged, manifest = load_model(results["model_dir"])
    assert manifest["role"] == "merged"
    n = results["encoder_layers"]
    choice = results["choice"]
    assert {b["name"]: (b["depth"], b["layers"]) for b in manifest["branches"]} == {
        t: (n - c["L"], c["l"]) for t, c in choice.items()}
    # Independently: each chosen branch's own artifact on the encoder vs the merged model, on fresh text.
    from kdlib.encoder import load_encoder

    enc = load_encoder(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"), True, TINY_ENCODER, seed=0)
    tok = load_tokenizer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"))
    batch = {k: torch.from_numpy(v) for k, v in tokenize(tok, ["a fine film", "not good at all, sadly"],
                                                         ["a film", "bad"], max_length=32).items()}
    out_merged = merged(**batch)
    for task, c in choice.items():
        single, _ = load_model(c["path"], encoder=enc)
        torch.testing.assert_close(out_merged[task], single(**batch)[task], atol=1e-5, rtol=0)
    assert results["chosen"]["overhead"] == pytest.approx(
        (max(n - c["L"] for c in choice.values()) + sum(c["l"] for c in choice.values())) / (n * len(choice)))


def test_report_names_each_choice_and_plots(sweep):
    _, _, _, results, out = sweep
    summary = (out / "summary.md").read_text()
    for task, c in results["choice"].items():
        assert f"| {task} | {c['L']} | {c['l']} |" in summary
        assert results["reasons"][task] in summary
    assert "budget" in summary and "threshold" in summary
    for png in ("tasks.png", "curve.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert {p["rule"] for p in results["curve"]} == {"threshold", "budget"}


def test_each_trial_writes_tensorboard_events(sweep):
    root = sweep[0]
    trials = [params.parent for params in root.rglob("params.json")]  # Tune's trial folders
    assert len(trials) >= 5
    for trial in trials:
        assert list(trial.glob("events.out.tfevents.*")), f"no TensorBoard events in {trial}"


def test_rerun_with_the_same_storage_resumes_without_recomputing(sweep, job, capsys):
    root, config, overrides, results, out = sweep
    before = {k: len(computed_entries(root, k)) for k in ("trunk_states", "teacher", "student", "teacher_outputs")}
    assert job["main"]([config, *overrides]) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    after = {k: len(computed_entries(root, k)) for k in before}
    assert after == before
    again = json.loads((out / "results.json").read_text())
    assert again["choice"] == results["choice"] and again["trials"] == results["trials"]
    assert again["failed_trials"] == results["failed_trials"]  # the restored failure keeps its (L, l)


def test_killed_sweep_resumes(ray_session, tmp_path, capsys):
    """A driver killed mid-sweep: the rerun restores the Tune experiment, finishes it, and no finished
    (L, l) student or cached trunk state is computed again."""
    root = tmp_path / "store"
    # L in [1, 3] x l in [1, 2]: 5 pairs, 3 epochs each, so the sweep is still running after its first student
    config = tiny_config(tmp_path, ("sentiment",))
    overrides = tiny_overrides(root, ("sentiment",)) + ["search.min_fine_tune_layers=1", "search.num_samples=6",
                                                        "student.epochs=3"]
    address = ray_session.get_runtime_context().gcs_address
    code = ("import runpy, sys; job = runpy.run_path(sys.argv[1], run_name='tune_job'); "
            "sys.exit(job['main'](sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "jobs" / "tune_depth.py"), config, *overrides,
                             f"ray.address={address}"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 150
    while time.time() < deadline and len(computed_entries(root, "student")) < 1 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {s["entry"] for s in computed_entries(root, "student")}
    assert len(done_before) >= 1
    time.sleep(2)  # the dead driver's trial actors are reaped by Ray

    state_saved = any((root / "tune_demo" / "tune" / "ray").glob("sentiment-*/experiment_state-*.json"))
    assert state_saved  # Tune saves its state when the sweep starts and as trials report
    job = runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")
    assert job["main"]([config, *overrides]) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    students = computed_entries(root, "student")
    assert len({s["entry"] for s in students}) == len(students)  # none of the finished ones trained again
    assert done_before <= {s["entry"] for s in students}
    assert len(computed_entries(root, "trunk_states")) == 3  # depths 3, 2, 1: once each across both runs
    results = json.loads((root / "tune_demo" / "tune" / "results.json").read_text())
    assert results["choice"]["sentiment"]["l"] >= 1 and results["failed_trials"] == []


def test_benchmark_times_the_sweep_with_and_without_caches(ray_session, job, tmp_path):
    config = tiny_config(tmp_path, ("sentiment",))
    overrides = [o for o in tiny_overrides(tmp_path, ("sentiment",)) if not o.startswith("storage_root")]
    out = job["benchmark"](config, overrides + ["search.num_samples=4"], str(tmp_path / "bench"))
    cached, uncached = out["cached"], out["uncached"]
    assert out["wall_speedup"] == pytest.approx(uncached["sweep_seconds"] / cached["sweep_seconds"])
    assert out["theoretical_speedup"] > 1
    # without caches every trial trains its own teacher; with them one per L
    assert len(computed_entries(tmp_path / "bench" / "cached", "teacher")) == 2
    assert computed_entries(tmp_path / "bench" / "uncached", "teacher") == []  # private, per-trial folders
    assert cached["curve"] and uncached["curve"]


@pytest.mark.parametrize("override, message", [
    ("search.max_fine_tune_layers=5", "search.max_fine_tune_layers=5: the encoder has only 4 layers"),
    ("selection.budget=1", "selection budget 1 is below one layer per task (2 tasks"),
])
def test_impossible_settings_fail_before_anything_runs(job, tmp_path, capsys, override, message):
    root = tmp_path / "store"
    assert job["main"]([tiny_config(tmp_path), *tiny_overrides(root), override]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "cache").exists()  # nothing trained, nothing cached


def test_a_trial_scores_dev_only_at_ashas_rungs_and_its_last_epoch(job, tmp_path):
    """5 epochs, grace 1, reduction factor 2: ASHA decides at epochs 1, 2 and 4, so dev is scored (and the
    student saved) after epochs 1, 2, 4 and 5, not 3; the costs count the same four dev passes."""
    from kdlib.tune.costs import layer_passes
    from kdlib.tune.trial import distill_student, prepare

    overrides = tiny_overrides(tmp_path, ("sentiment",)) + ["student.epochs=5", "scheduler.reduction_factor=2"]
    cfg = job["load_tune_config"](tiny_config(tmp_path, ("sentiment",)), overrides)
    data = load_tasks(cfg)["sentiment"]
    s = TrialSettings.from_config(cfg, data, EncoderRef.resolve(cfg.encoder, cfg.seed), str(tmp_path),
                                  str(tmp_path / "run"))
    assert s.scored_epochs == (1, 2, 4, 5)
    reports = []
    scores = distill_student(s, prepare(s, 2, tmp_path / "scratch"), 2, 1, tmp_path / "student",
                             lambda epoch, score, seen, last: reports.append((epoch + 1, last, seen)))
    assert [(e, last) for e, last, _ in reports] == [(1, False), (2, False), (4, False), (5, True)]
    assert [e for e, _ in scores] == [1, 2, 4, 5] and reports[-1][2] == [list(x) for x in scores]
    n_tr, n_dev = len(data.train), len(data.dev)
    table = pd.DataFrame([{"task": "sentiment", "L": 2, "l": 1, "status": "ok", "epochs": 5}])
    cached = layer_passes(table, encoder_layers=4, rows={"sentiment": (n_tr, n_dev)}, members=2, teacher_epochs=1,
                          scored_epochs=s.scored_epochs, cached=True)
    # trunk states at depth 2, the teachers' trunk pass, 2 members x 1 epoch x 2 layers x 3, their logits,
    # then the student: 5 epochs x 1 layer x 3 passes on train, 4 dev passes
    assert cached == 2 * (n_tr + n_dev) + 2 * n_tr + 2 * 2 * 3 * n_tr + 2 * 2 * (n_tr + n_dev) + 5 * 3 * n_tr + 4 * n_dev
