"""GPU settings reach Ray: the session Ray has 2 logical GPUs (tests/conftest.py), so work that asks for GPUs is
scheduled as on a GPU machine and runs on the CPU, since CUDA is not there. A setting the cluster cannot give
fails before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlib.config import load_run_config
from kdlib.errors import ResourceError
from kdlib.resources import ClusterGpus, GpuAsk, check_cluster_gpus, check_gpu_asks, cluster_gpus, gpu_asks

from conftest import tiny_run_overrides

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def test_gpu_asks_are_checked_per_unit_and_per_gang():
    none, one = ClusterGpus(0, 0), ClusterGpus(total=1, largest_node=1)
    with pytest.raises(ResourceError, match=r"labeling\.gpus_per_actor=0\.25 .* the cluster has no GPUs"):
        check_gpu_asks([GpuAsk("labeling.gpus_per_actor", 0.25, 4, "labeling.num_actors")], none)
    check_gpu_asks([GpuAsk("labeling.gpus_per_actor", 0.25, 4, "labeling.num_actors")], one)  # four share it
    with pytest.raises(ResourceError, match=r"distill\.num_workers=2 x distill\.gpus_per_worker=1 = 2 GPUs .* "
                                            r"has 1 GPUs"):
        check_gpu_asks([GpuAsk("distill.gpus_per_worker", 1, 2, "distill.num_workers")], one)
    with pytest.raises(ResourceError, match=r"teachers\.gpus_per_task=2 .* at most 1 on one node"):
        check_gpu_asks([GpuAsk("teachers.gpus_per_task", 2)], ClusterGpus(total=4, largest_node=1))
    grown = ClusterGpus(total=4, largest_node=1, autoscaled=True)
    with pytest.raises(ResourceError, match="can grow to 4 GPUs"):
        check_gpu_asks([GpuAsk("distill.gpus_per_worker", 1, 5, "distill.num_workers")], grown)


def test_the_run_fails_before_any_work_when_the_cluster_lacks_the_gpus(ray_session, tmp_path):
    """Against the session's Ray (2 logical GPUs, one node): what fits passes, what does not names its setting."""
    assert cluster_gpus() == ClusterGpus(total=2, largest_node=2)
    cfg = load_run_config(DEMO, [f"storage_root={tmp_path}"])
    assert gpu_asks(cfg) == []
    check_cluster_gpus(cfg)  # a CPU config asks nothing
    fits = load_run_config(DEMO, [f"storage_root={tmp_path}", "labeling.gpus_per_actor=0.5", "labeling.num_actors=4",
                                  "distill.gpus_per_worker=1", "distill.num_workers=2", "teachers.gpus_per_task=2"])
    check_cluster_gpus(fits)
    for override, message in [("distill.gpus_per_worker=1.5", r"distill\.num_workers=2 x distill\.gpus_per_worker"),
                              ("labeling.num_actors=5", r"labeling\.num_actors=5 x labeling\.gpus_per_actor=0\.5"),
                              ("teachers.gpus_per_task=3", r"teachers\.gpus_per_task=3 .* at most 2 on one node")]:
        bad = load_run_config(DEMO, [f"storage_root={tmp_path}", "labeling.gpus_per_actor=0.5",
                                     "labeling.num_actors=4", "distill.num_workers=2", override])
        with pytest.raises(ResourceError, match=message):
            check_cluster_gpus(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of logical GPUs")
def test_a_gpu_config_in_bf16_runs_every_stage_with_the_gpus_it_asked_for(ray_session, tmp_path):
    """The demo's stages with every GPU setting on and bf16: teacher tasks get their GPU share, the Ray Train
    worker gets its GPU (gloo: there is no NCCL without CUDA), each runs on the CPU it finds, and the merged
    model scores every task."""
    from kdlib.pipeline import (RunContext, distill_students, evaluate, label_tasks, load_data, merge_students,
                                plan_labels, train_teachers)

    overrides = tiny_run_overrides(tmp_path) + [f"tasks.{t}.max_train_examples=60"
                                                for t in ("sentiment", "paraphrase", "similarity")] + [
        "distill.num_workers=1", "distill.epochs=1", "run_name=gpu", "precision=bf16",
        "teachers.gpus_per_task=0.5", "labeling.gpus_per_actor=0.25", "distill.gpus_per_worker=0.5",
        "distill.backend=gloo"]
    cfg = load_run_config(DEMO, overrides)
    check_cluster_gpus(cfg)
    lines: list[str] = []
    ctx = RunContext.create(cfg, log=lines.append)
    tasks = load_data(ctx)
    teachers = train_teachers(ctx, tasks)
    for name, folder in teachers.dirs.items():
        done = json.loads((Path(folder).parent / "_DONE.json").read_text())
        assert done["resources"].get("GPU") == 0.5 and done["device"] == "cpu", (name, done)
    labels = plan_labels(ctx, tasks, teachers)
    label_tasks(ctx, labels, teachers)
    students = distill_students(ctx, tasks, labels, teachers)
    report = json.loads((Path(students.stage_dir) / "train_report.json").read_text())
    assert report["placement/gpus"] == [0.5] and report["placement/devices"] == ["cpu"]
    spec = json.loads((Path(students.stage_dir) / "train_spec.json").read_text())
    assert spec["precision"] == "bf16"
    results = evaluate(ctx, tasks, labels, merge_students(ctx, tasks, students))
    assert set(results.scores) == set(tasks)
    assert any("bf16" in line for line in lines), lines
