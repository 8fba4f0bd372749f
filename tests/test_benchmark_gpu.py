"""`jobs/benchmark.py gpu`: without CUDA it says so and exits 0 writing nothing; `--scale quick` runs every
section's code path at toy sizes on this device (the CPU here), so the script that runs on the GPU machine
has run once before it gets there."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _benchmark_main():
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    return runpy.run_path(str(ROOT / "jobs" / "benchmark.py"), run_name="benchmark_job")["main"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_gpu_benchmark_says_so_and_exits_0(tmp_path, capsys):
    assert _benchmark_main()(["gpu", "--out", str(tmp_path / "out"), "--storage-root", str(tmp_path / "runs")]) == 0
    assert "measures a CUDA GPU and this machine has none" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_quick_scale_runs_every_section(ray_session, tmp_path):
    out = tmp_path / "out"
    assert _benchmark_main()(["gpu", "--scale", "quick", "--out", str(out), "--storage-root",
                              str(tmp_path / "runs")]) == 0
    r = json.loads((out / "gpu-quick.json").read_text())
    assert r["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    for section in ("bound_toy", "text"):
        s = r[section]
        assert s["plain_seq_per_s"]["min"] <= s["plain_seq_per_s"]["median"] <= s["plain_seq_per_s"]["max"]
        assert len(s["plain_seq_per_s"]["runs"]) == 3
        assert s["busy_seq_per_s"] > 0 and s["end_to_end_seq_per_s"] > 0 and s["busy_vs_plain"] > 0
    assert set(r["demo"]["cpu"]) >= {"teachers", "labels", "distill", "merge"} and set(r["demo"]["gpu"]) == set(
        r["demo"]["cpu"])
    train = r["distill"]  # the GPU-settings run's Ray Train epoch against the same loop in one process
    assert train["ray_train_rows_per_s"] > 0 and train["single_process_rows_per_s"] > 0 and train["rows_per_epoch"] > 0
    serve = r["serve"]  # the merged model against one teacher deployment per task, batch 1 and 32
    assert {(x["setup"], x["kind"], x["batch"]) for x in serve["runs"]} == {
        (setup, kind, b) for setup in ("merged", "per_task") for kind in ("single", "all") for b in (1, 32)}
    for x in serve["runs"]:
        assert x["errors"] == 0 and x["requests"] == x["expected_requests"] > 0 and 0 < x["p50_ms"] <= x["p99_ms"]
    assert set(serve["merged_vs_per_task"]) >= {"all_b1", "all_b32"} and serve["merged_vs_per_task"]["all_b32"] > 0
    assert serve["gpus_per_replica"] == (0.16 if torch.cuda.is_available() else 0.0)
    assert r["targets"]["met"] is False  # toy sizes never count
    md = (out / "gpu-quick.md").read_text()
    assert (out / "gpu-quick.png").stat().st_size > 0 and "busy / plain" in md and "All-task, merged / per-task" in md
    assert not (out / "gpu-quick.partial.json").exists()  # written after each section, removed at the end
