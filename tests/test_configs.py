"""Every shipped config validates; the schema's error messages point at file, line and key."""

from pathlib import Path

import pytest

from kdlib.config import load_run_config
from kdlib.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    cfg = load_run_config(path)
    assert cfg.tasks
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "a config starts with a comment naming what it runs"


def test_there_are_configs():
    assert {"demo.yaml", "glue_mini.yaml"} <= {p.name for p in CONFIGS}


def test_glue_mini_data_dir_override(tmp_path):
    cfg = load_run_config(Path("configs/glue_mini.yaml"), [f"data_dir={tmp_path}"])
    assert cfg.task_path("mrpc", "dev") == str(tmp_path / "mrpc/dev.tsv")


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_wrong_kind_names_line_key_value_and_choices(tmp_path):
    p = _write(tmp_path, "tasks:\n  t:\n    kind: clasification\n    format: demo\n    train: sentiment\n"
                         "    dev: sentiment\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "bad.yaml, line 3" in msg and "tasks.t.kind" in msg and "'clasification'" in msg
    assert "'classification' or 'regression'" in msg


def test_unknown_key_lists_allowed_keys(tmp_path):
    p = _write(tmp_path, "tasks:\n  t: {kind: regression, format: demo, train: similarity, dev: similarity}\n"
                         "distill:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"line 4: distill.epoch.*allowed keys:.*epochs"):
        load_run_config(p)


def test_cross_field_rules(tmp_path):
    base = "tasks:\n  t: {kind: regression, format: tsv, train: a.tsv, dev: b.tsv%s}\n"
    with pytest.raises(ConfigError, match="data_dir is not set"):
        load_run_config(_write(tmp_path, base % ""))
    with pytest.raises(ConfigError, match="metric 'accuracy' does not fit kind 'regression'"):
        load_run_config(_write(tmp_path, base % ", metric: accuracy"), ["data_dir=/x"])
    with pytest.raises(ConfigError, match="must not exceed fine_tune_layers"):
        load_run_config(_write(tmp_path, base % ", fine_tune_layers: 1, branch_layers: 2"), ["data_dir=/x"])


def test_a_task_without_teacher_cannot_ask_for_teacher_targets(tmp_path):
    base = "tasks:\n  t: {kind: classification, format: demo, train: sentiment, dev: sentiment, teacher: false%s}\n"
    assert not load_run_config(_write(tmp_path, base % "")).tasks["t"].teacher
    for extra, field in ((", objective: kl", "objective"), (", augment: {copies: 2}", "augment.copies"),
                         (", unlabeled: more.txt", "unlabeled")):
        with pytest.raises(ConfigError, match=f"teacher: false trains on gold labels only, so {field}"):
            load_run_config(_write(tmp_path, base % extra), ["data_dir=/x"])


def test_student_kinds_and_their_architecture_arguments(tmp_path):
    path = _write(tmp_path, "tasks:\n  t: {kind: regression, format: demo, train: similarity, dev: similarity}\n")
    assert load_run_config(path).student.kind == "branched"
    cfg = load_run_config(path, ["student.kind=cmow", "student.matrix_dim=8"])
    assert cfg.student.hparams() == {"matrix_dim": 8, "cbow_dim": 400, "cbow_init": "random",
                                     "head_hidden": 512, "dropout": 0.1}
    with pytest.raises(ConfigError, match="student.cbow_init"):
        load_run_config(path, ["student.kind=cmow", "student.cbow_init=glove"])
    assert "pair_features" not in load_run_config(path, ["student.kind=bilstm"]).student.hparams()  # the paper's
    cfg = load_run_config(path, ["student.kind=bilstm", "student.pair_features=diff_product"])
    assert cfg.student.hparams()["pair_features"] == "diff_product"
    with pytest.raises(ConfigError, match="pair_features applies to bilstm and cmow.*small_transformer"):
        load_run_config(path, ["student.kind=small_transformer", "student.pair_features=diffcat"])
    with pytest.raises(ConfigError, match="cbow_init applies to cmow; student.kind is bilstm"):
        load_run_config(path, ["student.kind=bilstm", "student.cbow_init=encoder"])
    with pytest.raises(ConfigError, match="student.kind"):
        load_run_config(path, ["student.kind=gru"])
    assert load_run_config(path, ["student.kind=cmow", "tasks.t.bins=[0, 5, 0.2]"]).tasks["t"].bins == (0, 5, 0.2)
    with pytest.raises(ConfigError, match="set bins, which the end-to-end students use"):
        load_run_config(path, ["tasks.t.bins=[0, 5, 0.2]"])
    with pytest.raises(ConfigError, match="whole number of bins"):
        load_run_config(path, ["student.kind=cmow", "tasks.t.bins=[0, 5, 0.3]"])
