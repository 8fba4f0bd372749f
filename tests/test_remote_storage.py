"""Everything a run keeps, under a storage root that is a URI: a real S3 endpoint (moto's server) on loopback.

A fresh node is played by wiping this machine's mirrors (KDLIB_LOCAL_CACHE): whatever it still reads must
come from the bucket.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from conftest import tiny_run_overrides
from kdlib import storage
from kdlib.artifact import load_model
from kdlib.encoder import load_tokenizer, resolve_encoder_path
from kdlib.predict import predict
from kdlib.stages import StageCache

ROOT = Path(__file__).resolve().parent.parent


def listing(location: str) -> dict[str, int]:
    """Files below a location (relative path -> size), read straight from its filesystem."""
    fs, path = storage.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def wipe_mirrors() -> None:
    for entry in storage.local_cache_dir().iterdir():
        shutil.rmtree(entry)


def test_locations_below_a_uri_keep_its_query():
    uri = "s3://b/root?endpoint_override=h:1&scheme=http"
    loc = storage.child(uri, "cache", "teachers", "abc")
    assert loc == "s3://b/root/cache/teachers/abc?endpoint_override=h:1&scheme=http"
    assert storage.name(loc) == "abc" and storage.name(storage.parent(loc)) == "teachers"
    assert storage.filesystem(loc)[1] == "b/root/cache/teachers/abc"
    assert storage.child("relative/dir", "x") == str(Path("relative/dir").resolve() / "x")


def test_staged_folder_is_uploaded_whole_and_mirrored_once(s3_root):
    loc = storage.child(s3_root, "cache", "s", "fp")
    with pytest.raises(RuntimeError):
        with storage.staged_dir(loc) as out:
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("the stage died")
    assert listing(loc) == {}  # nothing of a failed stage reaches the bucket
    with storage.staged_dir(loc) as out:
        (out / "sub").mkdir()
        (out / "sub" / "w.bin").write_bytes(b"w" * 1000)
        (out / "a.txt").write_text("a")
    assert listing(loc) == {"a.txt": 1, "sub/w.bin": 1000}
    wipe_mirrors()
    copy = storage.local_copy(loc)
    assert (copy / "sub" / "w.bin").read_bytes() == b"w" * 1000 and (copy / "a.txt").read_text() == "a"
    (copy / "a.txt").write_text("mirror")  # a second read is served from the mirror, not downloaded again
    assert (storage.local_copy(loc) / "a.txt").read_text() == "mirror"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.local_copy(storage.child(s3_root, "nothing"))


def test_stage_cache_in_a_bucket_reruns_only_unfinished_stages(s3_root):
    runs = []

    def work(out):
        runs.append(out)
        (out / "x.txt").write_text("ok")
        return {"where": "here"}

    first = StageCache(s3_root, log=lambda *_: None).run("s", "fp1", work)
    again = StageCache(s3_root, log=lambda *_: None)  # another driver, same bucket
    assert again.run("s", "fp1", work) == first and len(runs) == 1
    assert again.records[0].cached and again.records[0].where == "reused (ran on here)"
    assert listing(first) == {"x.txt": 2, "_DONE.json": listing(first)["_DONE.json"]}
    # An output without its marker (a driver died mid-upload) is cleared and redone.
    storage.write_text_at(storage.child(s3_root, "cache", "s", "fp2", "partial"), "half")
    out, done = again.begin("s", "fp2")
    assert not done and listing(out) == {}


@pytest.mark.slow
def test_distill_job_keeps_every_output_in_the_bucket_and_a_fresh_node_reuses_them(ray_session, s3_root):
    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    overrides = tiny_run_overrides(s3_root)
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    run_dir = storage.child(s3_root, "demo")
    results = json.loads(storage.read_text_at(storage.child(run_dir, "results.json")))
    files = listing(run_dir)
    assert {"config.yaml", "results.json", "results.md", "curves.png"} <= set(files)
    assert any(n.startswith("tensorboard/distill/events.out.tfevents.") for n in files), sorted(files)
    # Every stage's output is a location in the bucket, finished (marker or manifest) and not empty.
    names = {s["name"] for s in results["stages"]}
    assert names == {"teachers", "labels", "distill", "merge"}, names
    for stage in results["stages"]:
        assert stage["path"].startswith("s3://") and not stage["cached"], stage
        files = listing(stage["path"])
        assert ("_DONE.json" in files) if stage["name"] != "labels" else ("manifest.json" in files), (stage, files)
    distill = next(s["path"] for s in results["stages"] if s["name"] == "distill")
    files = listing(distill)
    assert any(f.startswith("ray_train/distill/checkpoint_") for f in files), files  # Ray Train wrote there
    assert {"students/sentiment/weights.safetensors", "train_report.json"} <= set(files)
    assert results["model_dir"].startswith("s3://") and "weights.safetensors" in listing(results["model_dir"])

    # A fresh node (no mirrors) with the same config reuses every stage from the bucket and scores the same.
    wipe_mirrors()
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    again = json.loads(storage.read_text_at(storage.child(run_dir, "results.json")))
    assert all(s["cached"] for s in again["stages"]), again["stages"]
    for task, score in results["scores"].items():
        assert again["scores"][task]["primary"]["student"] == score["primary"]["student"]

    # Serving from the run's URI: the replica mirrors the artifact named by the run's results.json.
    from kdlib.serve.model import Job, ServedModel

    wipe_mirrors()
    served = ServedModel.load(run_dir)
    assert served.model_dir == results["model_dir"] and set(served.tasks) == set(results["scores"])
    assert os.listdir(storage.local_cache_dir())  # it came down from the bucket
    texts = ["a fine film", "not good at all"]
    got = served.infer([Job(texts, [None, None], ("sentiment",))])[0]
    merged, _ = load_model(storage.local_copy(results["model_dir"]))
    ref = predict(merged, load_tokenizer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2")), texts, None,
                  ["sentiment"], max_length=32)["sentiment"]
    probs = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    np.testing.assert_allclose([[g["sentiment"]["probabilities"][n] for n in ("negative", "positive")] for g in got],
                               probs, atol=1e-5)


@pytest.mark.slow
def test_depth_search_keeps_its_caches_sweep_and_model_in_the_bucket(ray_session, s3_root, tmp_path, capsys):
    """jobs/tune_depth.py on a bucket: trials share teachers and trunk states through it (computed once, the
    entry leases held by a Ray actor), Tune keeps its experiment there, and a rerun resumes from it."""
    from test_tune import tiny_config, tiny_overrides

    from kdlib.tune.caches import computed_entries

    job = runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")
    config = tiny_config(tmp_path, ("sentiment",))
    overrides = tiny_overrides(s3_root, ("sentiment",)) + ["search.num_samples=4"]
    assert job["main"]([config, *overrides]) == 0
    out = storage.child(s3_root, "tune_demo", "tune")
    results = json.loads(storage.read_text_at(storage.child(out, "results.json")))
    files = listing(out)
    assert {"config.yaml", "table.csv", "summary.md", "tasks.png", "curve.png", "model/weights.safetensors"} <= set(files)
    assert any(f.startswith("ray/sentiment-") and "experiment_state-" in f for f in files), files
    assert results["model_dir"] == storage.child(out, "model") and results["max_output_difference"]["sentiment"] <= 1e-5
    teachers = computed_entries(s3_root, "teacher")
    assert sorted(t["L"] for t in teachers) == [2, 3]  # one per L, whatever the number of trials
    assert len(computed_entries(s3_root, "trunk_states")) == 2
    students = computed_entries(s3_root, "student")
    assert students and len({s["entry"] for s in students}) == len(students)
    assert all(c["path"].startswith("s3://") for c in results["choice"].values())

    wipe_mirrors()  # a fresh node: the rerun resumes the sweep from the bucket and computes nothing again
    before = {k: len(computed_entries(s3_root, k)) for k in ("teacher", "trunk_states", "student")}
    assert job["main"]([config, *overrides]) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    assert {k: len(computed_entries(s3_root, k)) for k in before} == before
    again = json.loads(storage.read_text_at(storage.child(out, "results.json")))
    assert again["choice"] == results["choice"]
