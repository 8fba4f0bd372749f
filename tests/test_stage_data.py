"""kdlib.pipeline.data: every task read, validated and digested; the digest is what later stages key on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlib.config import load_run_config
from kdlib.errors import KdlibError
from kdlib.pipeline import RunContext, load_data

ROOT = Path(__file__).resolve().parent.parent


def tsv_config(tmp_path: Path, train_rows: list[tuple[str, str]]) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in train_rows))
    (data / "dev.tsv").write_text("text\tlabel\na fine film\tpos\nawful\tneg\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"storage_root: {tmp_path / 'runs'}\ndata_dir: {data}\ntasks:\n  mood:\n"
                      "    kind: classification\n    format: tsv\n    train: train.tsv\n    dev: dev.tsv\n"
                      "    text_column: text\n")
    return config


def load(config: Path, *overrides: str):
    lines: list[str] = []
    return load_data(RunContext.create(load_run_config(config, list(overrides)), log=lines.append)), lines


def test_load_data_reads_every_task_and_says_what_it_read(tmp_path):
    tasks, lines = load(ROOT / "configs" / "demo.yaml", f"storage_root={tmp_path}",
                        "tasks.sentiment.max_train_examples=50")
    assert set(tasks) == {"sentiment", "paraphrase", "similarity"}
    assert len(tasks["sentiment"].train) == 50 and tasks["sentiment"].label_names == ["negative", "positive"]
    assert tasks["similarity"].kind == "regression" and tasks["similarity"].num_outputs == 1
    assert lines[0] == f"[data:sentiment] classification, 50 train / {len(tasks['sentiment'].dev)} dev, " \
                       "labels ['negative', 'positive']"
    assert tasks["paraphrase"].train["text_pair"].notna().all()


def test_the_digest_follows_the_content(tmp_path):
    rows = [("good", "pos"), ("bad", "neg"), ("fine", "pos")]
    first, _ = load(tsv_config(tmp_path, rows))
    again, _ = load(tsv_config(tmp_path, rows))
    assert first["mood"].digest == again["mood"].digest
    relabeled, _ = load(tsv_config(tmp_path, [("good", "pos"), ("bad", "neg"), ("fine", "neg")]))
    assert relabeled["mood"].digest != first["mood"].digest
    # dev is read against train's label set: the same names mean the same class ids
    assert first["mood"].label_names == ["neg", "pos"] and first["mood"].dev["label"].tolist() == [1, 0]


def test_a_missing_column_names_the_file(tmp_path):
    config = tsv_config(tmp_path, [("good", "pos")])
    with pytest.raises(KdlibError, match=r"train\.tsv.*sentence|sentence.*train\.tsv"):
        load(config, "tasks.mood.text_column=sentence")


def test_a_tsv_without_header_row_loads_by_position(tmp_path):
    config = tsv_config(tmp_path, [("good", "pos")])
    data = tmp_path / "data"
    (data / "topics.tsv").write_text("stocks fell today\tbusiness\nthe striker scored twice\tsport\n"
                                     "new chips are faster\ttech\nmarkets rallied\tbusiness\n")
    headerless = ["tasks.mood.train=topics.tsv", "tasks.mood.dev=topics.tsv"]
    # read with the default header row, the first example is taken for column names, and the error says so
    with pytest.raises(KdlibError, match=r"topics\.tsv, line 1, column 'text': not found \(columns: 'stocks fell "
                                         r"today', 'business'\); the first row looks like data: if the file has no "
                                         r"header row, set tasks\.mood\.header: false and give columns by position "
                                         r"\(text_column: 0, label_column: 1\)"):
        load(config, *headerless)
    tasks, _ = load(config, *headerless, "tasks.mood.header=false", "tasks.mood.text_column=0",
                    "tasks.mood.label_column=1")
    mood = tasks["mood"]
    assert len(mood.train) == 4 and mood.train["text"].iloc[0] == "stocks fell today"
    assert mood.label_names == ["business", "sport", "tech"] and mood.train["label"].tolist() == [0, 1, 2, 0]
