"""kdlib.curves: histories into TensorBoard event files (read back here by parsing their records) and a PNG;
and the run folder's curves from the tiny pipeline's training stages."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import matplotlib.image
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from kdlib.curves import plot_curves, task_names, write_events
from kdlib.pipeline import write_results
from kdlib.pipeline.evaluate import stage_histories

HISTORIES = {
    "distill": [{"epoch": 1, "step": 10, "seconds": 1.5, "lr": 1e-3, "loss/a": 0.7, "loss/ab": math.nan, "dev/a": 50.0,
                 "dev/ab": 10.0},
                {"epoch": 2, "step": 20, "seconds": 1.25, "lr": 5e-4, "loss/a": 0.5, "loss/ab": 2.0, "dev/a": 62.5,
                 "dev/ab": 20.0}],
    "teachers/a": [{"epoch": 1, "loss/a__m0": 0.9, "dev/a__m0": 55.0, "loss/a__m1": 0.8, "dev/a__m1": 57.0}],
}


def _masked(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from a TensorBoard run folder's event files (TFRecord framing: length, its
    CRC, an Event protobuf, its CRC; every CRC checked)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(run.glob("events.out.tfevents.*"))
    assert files, f"no event file in {run}"
    for f in files:
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked(header)
            body = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == _masked(body)
            pos += 16 + n
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_history_reads_back_from_its_event_files(tmp_path):
    runs = write_events(HISTORIES, tmp_path)
    assert runs == [tmp_path / "distill", tmp_path / "teachers" / "a"]
    distill = read_scalars(tmp_path / "distill")
    assert set(distill) == {"step", "seconds", "lr", "loss/a", "loss/ab", "dev/a", "dev/ab"}  # not "epoch"
    assert distill["dev/a"] == [(1, 50.0), (2, 62.5)]
    assert distill["lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))]
    assert distill["loss/ab"] == [(2, 2.0)]  # a NaN loss (no rows that epoch) is left out
    teachers = read_scalars(tmp_path / "teachers" / "a")
    assert teachers == {"loss/a__m0": [(1, pytest.approx(0.9))], "dev/a__m0": [(1, 55.0)],
                        "loss/a__m1": [(1, pytest.approx(0.8))], "dev/a__m1": [(1, 57.0)]}


def test_a_tasks_curves_are_its_own_and_its_members_not_a_longer_names():
    assert task_names(HISTORIES["distill"], "dev", "a") == ["a"]
    assert task_names(HISTORIES["distill"], "loss", "ab") == ["ab"]
    assert task_names(HISTORIES["teachers/a"], "dev", "a") == ["a__m0", "a__m1"]
    assert task_names(HISTORIES["teachers/a"], "dev", "ab") == []


def test_the_png_has_a_row_per_task(tmp_path):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    plot_curves(HISTORIES, {"a": "accuracy"}, one)
    plot_curves(HISTORIES, {"a": "accuracy", "ab": "pearson"}, two, baselines={"a": 44.0})
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h1, w1 = matplotlib.image.imread(one).shape[:2]
    h2, w2 = matplotlib.image.imread(two).shape[:2]
    assert w1 == w2 == 1000 and h2 == 2 * h1  # 2.8 inches a row at 100 dpi


def test_the_run_folder_gets_every_training_stages_curves(tiny_pipeline):
    p = tiny_pipeline
    write_results(p.ctx, p.results)
    run = p.root / "stages"
    histories = stage_histories(p.ctx.cache.records)
    assert sorted(histories) == ["distill", "teachers/paraphrase", "teachers/sentiment", "teachers/similarity"]
    distill = json.loads((Path(p.students.stage_dir) / "history.json").read_text())["epochs"]
    assert histories["distill"] == distill and len(distill) == p.cfg.distill.epochs
    events = read_scalars(run / "tensorboard" / "distill")
    for name in p.tasks:
        assert events[f"dev/{name}"] == [(r["epoch"], pytest.approx(r[f"dev/{name}"], abs=1e-4)) for r in distill]
        assert events[f"loss/{name}"] == [(r["epoch"], pytest.approx(r[f"loss/{name}"], rel=1e-6)) for r in distill]
        teacher = read_scalars(run / "tensorboard" / "teachers" / name)
        assert sorted(teacher) == sorted(f"{kind}/{name}__m{k}" for kind in ("loss", "dev")
                                         for k in range(p.cfg.teachers.members))
        assert all(len(v) == p.cfg.teachers.epochs for v in teacher.values())
    assert matplotlib.image.imread(run / "curves.png").shape[0] == 3 * 280  # a row per task
    assert "curves: `curves.png`" in (run / "results.md").read_text()
    # written again (a rerun of the run name): replaced, not a second set of event files
    write_results(p.ctx, p.results)
    assert len(list((run / "tensorboard" / "distill").glob("events.out.tfevents.*"))) == 1
