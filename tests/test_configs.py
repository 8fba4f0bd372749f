"""Every shipped config validates with its schema; the schema's error messages point at file, line and key;
the run and the depth-search configs share one base schema."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdlib.config import load_run_config
from kdlib.errors import ConfigError
from kdlib.serve.api import ServeArgs, UserConfig
from kdlib.tune.config import load_tune_config

ROOT = Path(__file__).resolve().parent.parent
LOADERS = {"configs": load_run_config, "configs/tune": load_tune_config}  # folder -> its schema's loader
CONFIGS = sorted(p for folder in LOADERS for p in (ROOT / folder).glob("*.yaml"))
SERVE_CONFIGS = sorted((ROOT / "configs" / "serve").glob("*.yaml"))


def _loader(path: Path):
    return LOADERS[str(path.parent.relative_to(ROOT))]


def test_every_yaml_in_configs_has_a_schema():
    # A config in a new folder (or a new kind of file) must get a schema here, or its typos go unnoticed.
    every = sorted((ROOT / "configs").rglob("*.y*ml"))
    assert every == sorted(CONFIGS + SERVE_CONFIGS) and CONFIGS and SERVE_CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates(path):
    cfg = _loader(path)(path)
    # The file's own values win over the schema's defaults (run_name's defaults differ between the schemas).
    assert cfg.run_name == yaml.safe_load(path.read_text())["run_name"]
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "a config starts with a comment naming what it runs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_misspelt_key_in_a_shipped_config_names_file_line_and_key(path, tmp_path):
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("encoder:")) + 1
    bad = tmp_path / f"broken_{path.name}"
    bad.write_text("\n".join(lines[:at] + ["  max_lenght: 64"] + lines[at:]) + "\n")
    with pytest.raises(ConfigError, match=rf"broken_{path.name}, line {at + 1}: encoder.max_lenght = 64: "
                                          r"Extra inputs are not permitted; allowed keys: name, path, .*max_length"):
        _loader(path)(bad)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_validates_and_a_misspelt_arg_is_named(path):
    (app,) = yaml.safe_load(path.read_text())["applications"]
    args = ServeArgs.model_validate(app["args"])
    assert args.max_batch_size == app["args"]["max_batch_size"]
    for d in app["deployments"]:
        UserConfig.model_validate(d["user_config"])
    misspelt = {("max_batch_sise" if k == "max_batch_size" else k): v for k, v in app["args"].items()}
    with pytest.raises(ValidationError, match=r"max_batch_sise\n  Extra inputs are not permitted"):
        ServeArgs.model_validate(misspelt)


MINIMAL = "tasks:\n  t: {kind: regression, format: demo, train: similarity, dev: similarity}\n"


def test_run_and_tune_configs_keep_their_own_defaults(tmp_path):
    path = _write(tmp_path, MINIMAL)
    run, tune = load_run_config(path), load_tune_config(path)
    assert (run.run_name, tune.run_name) == ("demo", "tune_demo")
    assert (run.student.kind, tune.student.epochs) == ("branched", 4)  # each schema's own `student`


@pytest.mark.parametrize("text, override, problem", [
    (MINIMAL, "run_name=a/b", r"run_name = 'a/b': String should match pattern"),
    (MINIMAL, "tasks.t.kind=clasification", r"tasks.t.kind = 'clasification'"),
    (MINIMAL, "encoder.max_length=4", r"encoder.max_length = 4: Input should be greater than or equal to 8"),
    (MINIMAL, "teachers.members=0", r"teachers.members = 0: Input should be greater than or equal to 1"),
    (MINIMAL, "ray.num_cpus=0", r"ray.num_cpus = 0: Input should be greater than or equal to 1"),
    ("tasks: {}\n", "seed=1", r"tasks: at least one task is needed"),
    (MINIMAL.replace("  t:", "  t t:"), "seed=1", r"task name 't t': use letters, digits"),
    (MINIMAL.replace("format: demo", "format: tsv"), "seed=1", r"data_dir is not set but tasks \['t'\]"),
])
def test_a_shared_field_is_checked_once_for_both_jobs(tmp_path, text, override, problem):
    path = _write(tmp_path, text)
    problems = []
    for load in (load_run_config, load_tune_config):
        with pytest.raises(ConfigError) as e:
            load(path, [override])
        problems.append(e.value.problems)
    assert problems[0] == problems[1]  # the same rule, word for word, in the run and the depth search
    assert any(re.search(problem, line) for line in problems[0]), problems[0]


def test_a_tune_config_with_an_unknown_key_names_it(tmp_path):
    text = (ROOT / "configs" / "tune" / "demo.yaml").read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  epochs: 4"))
    bad = _write(tmp_path, text.replace("  epochs: 4 ", "  epoch: 4  "))
    with pytest.raises(ConfigError) as e:
        load_tune_config(bad)
    (problem,) = e.value.problems
    # The trial student's keys, not the distillation student's (`kind`, `hidden`, ...): the YAML key `student`
    # is TrialStudentConfig here.
    assert problem == (f"{bad}, line {line}: student.epoch = 4: Extra inputs are not permitted; allowed keys: "
                       "epochs, batch_size, lr, weight_decay, temperature, alpha")
    with pytest.raises(ConfigError, match=r"\(from command line\): labeling = .*Extra inputs are not permitted"):
        load_tune_config(ROOT / "configs" / "tune" / "demo.yaml", ["labeling={num_actors: 2}"])  # a run's key


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


def test_header_false_takes_columns_by_position(tmp_path):
    base = ("data_dir: /x\ntasks:\n  t:\n    kind: classification\n    format: tsv\n    train: a.tsv\n"
            "    dev: b.tsv\n    header: false\n")
    task = load_run_config(_write(tmp_path, base), ["tasks.t.text_column=0", "tasks.t.label_column=1"]).tasks["t"]
    assert (task.header, task.text_column, task.label_column) == (False, 0, 1)
    cases = [  # (overrides, the problem's key, what it says)
        (["tasks.t.label_column=1"], "tasks.t", (r"header: false reads a file without column names, so text_column "
                                                 r"must be a column position \(0 is the first column\), not the "
                                                 r"name 'sentence' \(the default\)")),
        (["tasks.t.text_column=0", "tasks.t.label_column=label"], "tasks.t.label_column = 'label'",
         "so label_column must be a column position"),
        (["tasks.t.text_column=0", "tasks.t.label_column=1", "tasks.t.text_pair_column=s2"],
         "tasks.t.text_pair_column = 's2'", "so text_pair_column must be a column position"),
        (["tasks.t.text_column=-1", "tasks.t.label_column=1"], "tasks.t.text_column = -1",
         r"a column position counts from 0"),
        (["tasks.t.text_column=1", "tasks.t.label_column=1"], "tasks.t",
         "text_column, text_pair_column and label_column must be different columns"),
        (["tasks.t.text_column=0", "tasks.t.label_column=1", "tasks.t.format=jsonl"], "tasks.t.header = False",
         "header: false applies to tsv and csv files; jsonl files name their columns"),
        (["tasks.t.header=true", "tasks.t.label_column=1", "tasks.t.format=parquet"], "tasks.t.label_column = 1",
         "a column position applies to tsv and csv files; give the parquet column's name"),
        (["tasks.t.text_column=0", "tasks.t.label_column=true"], "tasks.t.label_column = True",
         "Input should be a valid"),  # YAML's true is no position
    ]
    for overrides, key, says in cases:
        with pytest.raises(ConfigError) as e:
            load_run_config(_write(tmp_path, base), overrides)
        assert any(key in p and re.search(says, p) for p in e.value.problems), (overrides, e.value.problems)
    # with a header row, names and positions both work, and a quoted number is a name
    task = load_run_config(_write(tmp_path, base), ["tasks.t.header=true", "tasks.t.text_column=1",
                                                    "tasks.t.label_column='0'"]).tasks["t"]
    assert (task.header, task.text_column, task.label_column) == (True, 1, "0")
