"""jobs/transfer_set.py: the training rows past the cap, as unlabeled text that jobs/distill.py reads."""

from __future__ import annotations

import runpy
from pathlib import Path

from kdlib.augment import read_unlabeled

ROOT = Path(__file__).resolve().parent.parent


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def _glue(tmp_path: Path) -> Path:
    data = tmp_path / "glue"
    _tsv(data / "sst2" / "train.tsv", ["sentence", "label"], [[f"film {i} is fine", str(i % 2)] for i in range(7)])
    _tsv(data / "mrpc" / "train.tsv", ["label", "id1", "id2", "sentence1", "sentence2"],
         [[str(i % 2), "a", "b", f"left {i}", f"right {i}"] for i in range(5)])
    _tsv(data / "stsb" / "train.tsv", ["sentence1", "sentence2", "score"], [[f"s {i}", f"t {i}", "2.5"] for i in range(3)])
    return data


def test_rows_past_the_cap_become_unlabeled_files(tmp_path, capsys):
    data = _glue(tmp_path)
    out = tmp_path / "transfer"
    job = runpy.run_path(str(ROOT / "jobs" / "transfer_set.py"), run_name="transfer_job")
    code = job["main"]([str(ROOT / "configs" / "glue_mini.yaml"), f"data_dir={data}", "tasks.sst2.max_train_examples=4",
                        "tasks.mrpc.max_train_examples=2", "tasks.stsb.max_train_examples=3", "--out", str(out)])
    assert code == 0
    sst2 = read_unlabeled(str(out / "sst2.txt"), task="sst2", has_pair=False)
    assert list(sst2["text"]) == ["film 4 is fine", "film 5 is fine", "film 6 is fine"]
    mrpc = read_unlabeled(str(out / "mrpc.txt"), task="mrpc", has_pair=True)
    assert list(zip(mrpc["text"], mrpc["text_pair"])) == [(f"left {i}", f"right {i}") for i in (2, 3, 4)]
    assert not (out / "stsb.txt").exists()  # nothing past the cap: no file, no override
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed == [f"tasks.sst2.unlabeled={out / 'sst2.txt'}", f"tasks.mrpc.unlabeled={out / 'mrpc.txt'}"]


def test_students_benchmark_transfer_scale_adds_the_files_and_the_masked_copies(tmp_path):
    from conftest import benchmark_module

    students = benchmark_module("students")
    SCALES, transfer_overrides = students.SCALES, students.transfer_overrides

    data = _glue(tmp_path)
    base = [f"data_dir={data}", "tasks.sst2.max_train_examples=4", "tasks.mrpc.max_train_examples=2",
            "tasks.stsb.max_train_examples=3"]
    out = tmp_path / "transfer"
    overrides = transfer_overrides(str(ROOT / "configs" / "glue_mini.yaml"), base, out, SCALES["transfer"]["copies"])
    assert overrides == [f"tasks.sst2.unlabeled={out / 'sst2.txt'}", f"tasks.mrpc.unlabeled={out / 'mrpc.txt'}",
                         "tasks.sst2.augment.copies=10", "tasks.mrpc.augment.copies=10", "tasks.stsb.augment.copies=40"]
