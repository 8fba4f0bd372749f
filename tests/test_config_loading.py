"""Tests for kdlib.config_loading: YAML + overrides -> validated model, with actionable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdlib.config_loading import apply_overrides, dump_config, load_config, parse_overrides
from kdlib.errors import ConfigError, KdlibError


# --------------------------------------------------------------------------- toy schema


class Optim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)
    kind: Literal["adam", "sgd"] = "adam"


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["classification", "regression"]
    data: str
    num_labels: int = Field(2, gt=0)


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    epochs: int = Field(1, gt=0)
    flag: bool = False
    names: list[str] = []
    optim: Optim = Optim()
    tasks: dict[str, Task]


# Line numbers below are asserted by the tests; keep them in sync with this text.
VALID = """\
name: demo
epochs: 2
names: [x, y]
optim:
  lr: 0.001
  kind: adam
tasks:
  sst2:
    kind: classification
    data: sst2.csv
  stsb:
    kind: regression
    num_labels: 1
    data: stsb.csv
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, overrides: list[str] = (), model: type[BaseModel] = Cfg) -> str:
    """Load expecting failure; return the message."""
    with pytest.raises(ConfigError) as info:
        load_config(model, path, overrides)
    return str(info.value)


def edit(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new, 1)


# --------------------------------------------------------------------------- loading & overrides


def test_valid_file_loads(tmp_path: Path) -> None:
    cfg = load_config(Cfg, write(tmp_path, VALID))
    assert cfg.name == "demo" and cfg.epochs == 2 and cfg.names == ["x", "y"]
    assert cfg.optim == Optim(lr=0.001, kind="adam")
    assert cfg.tasks["stsb"] == Task(kind="regression", data="stsb.csv", num_labels=1)
    assert cfg.tasks["sst2"].num_labels == 2


def test_path_may_be_a_string(tmp_path: Path) -> None:
    assert load_config(Cfg, str(write(tmp_path, VALID))).name == "demo"


def test_overrides_coerce_types_and_reach_nested_keys(tmp_path: Path) -> None:
    cfg = load_config(
        Cfg,
        write(tmp_path, VALID),
        ["epochs=3", "optim.lr=1e-4", "flag=true", "names=[a,b]", "tasks.sst2.num_labels=5"],
    )
    assert cfg.epochs == 3
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.flag is True
    assert cfg.names == ["a", "b"]
    assert cfg.tasks["sst2"].num_labels == 5
    assert cfg.tasks["stsb"].num_labels == 1  # siblings untouched


def test_override_adds_a_dict_entry(tmp_path: Path) -> None:
    cfg = load_config(
        Cfg,
        write(tmp_path, VALID),
        ["tasks.mrpc.kind=classification", "tasks.mrpc.data=mrpc.csv"],
    )
    assert set(cfg.tasks) == {"sst2", "stsb", "mrpc"}
    assert cfg.tasks["mrpc"].data == "mrpc.csv"


def test_override_replaces_a_whole_mapping(tmp_path: Path) -> None:
    cfg = load_config(Cfg, write(tmp_path, VALID), ["optim={kind: sgd}"])
    assert cfg.optim == Optim(kind="sgd")  # lr back to its default: replaced, not merged


def test_yaml_file_reads_exponent_floats_as_floats(tmp_path: Path) -> None:
    cfg = load_config(Cfg, write(tmp_path, edit("lr: 0.001", "lr: 5e-5")))
    assert cfg.optim.lr == pytest.approx(5e-5)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("a=3", (("a",), 3)),
        ("a.b.c=1e-4", (("a", "b", "c"), 1e-4)),
        ("a=-2.5E+3", (("a",), -2500.0)),
        ("a=.5e1", (("a",), 5.0)),
        ("a=[1,2]", (("a",), [1, 2])),
        ("a=[1e-3, x]", (("a",), [1e-3, "x"])),
        ("a=null", (("a",), None)),
        ("a=true", (("a",), True)),
        ("a=x", (("a",), "x")),
        ("a='1e-4'", (("a",), "1e-4")),  # quoting keeps a string
        ("a=b=c", (("a",), "b=c")),  # only the first '=' separates
        ("a=", (("a",), "")),
        (" a.b = 7 ", (("a", "b"), 7)),
    ],
)
def test_parse_overrides_values(item: str, expected: tuple) -> None:
    assert parse_overrides([item]) == [expected]


@pytest.mark.parametrize("item", ["epochs", "=3", "a..b=1", ".a=1", "a.=1", "a=[1,2"])
def test_parse_overrides_rejects_malformed(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    assert repr(item) in str(info.value)


def test_config_error_is_a_kdlib_error() -> None:
    with pytest.raises(KdlibError):
        parse_overrides(["nope"])


def test_apply_overrides_creates_paths_and_copies() -> None:
    data = {"a": {"b": 1}, "c": [1]}
    result = apply_overrides(data, [(("a", "x", "y"), 2), (("c",), [3])])
    assert result == {"a": {"b": 1, "x": {"y": 2}}, "c": [3]}
    assert data == {"a": {"b": 1}, "c": [1]}  # input untouched


def test_apply_overrides_later_wins() -> None:
    assert apply_overrides({}, parse_overrides(["a=1", "a=2"])) == {"a": 2}


def test_apply_overrides_below_a_scalar_names_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"optim": {"lr": 0.1}}, [(("optim", "lr", "x"), 1)])
    assert "optim.lr.x" in str(info.value) and "optim.lr" in str(info.value)


def test_bad_override_in_load_config(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID), ["epochs"])
    assert "'epochs'" in message and "KEY=VALUE" in message


# --------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


def test_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\nepochs: 2\noptim:\n  lr: [1, 2\n  kind: adam\n")
    message = config_error(path)
    assert "cfg.yaml, line 5" in message and "invalid YAML" in message


def test_bad_indentation_reports_its_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "name: demo\n  epochs: 2\n"))
    assert "cfg.yaml, line 2, column" in message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID + "epochs: 4\n"))
    assert "cfg.yaml, line 15" in message and "duplicate key 'epochs'" in message
    assert "line 2" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "- a\n- b\n"))
    assert "cfg.yaml" in message and "mapping" in message


def test_empty_file(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "# only a comment\n"))
    assert "cfg.yaml" in message and "empty" in message


def test_unsafe_tags_are_refused(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "name: !!python/object/apply:os.getcwd []\n"))
    assert "cfg.yaml, line 1" in message


# --------------------------------------------------------------------------- validation errors


def test_literal_error_names_line_path_value_and_choices(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("kind: classification", "kind: clasification")))
    assert (
        "cfg.yaml, line 9: tasks.sst2.kind = 'clasification': "
        "Input should be 'classification' or 'regression'"
    ) in message


def test_numeric_constraint(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("epochs: 2", "epochs: 0")))
    assert "cfg.yaml, line 2: epochs = 0: Input should be greater than 0" in message


def test_wrong_type_in_a_list(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("names: [x, y]", "names: [x, [1]]")))
    assert "cfg.yaml, line 3: names[1] = [1]: Input should be a valid string" in message


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("  lr: 0.001", "  lrr: 0.001")))
    assert "cfg.yaml, line 5: optim.lrr = 0.001: Extra inputs are not permitted" in message
    assert "allowed keys: lr, kind" in message


def test_unknown_key_inside_a_dict_entry(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("    num_labels: 1", "    labels: 1")))
    assert "cfg.yaml, line 13: tasks.stsb.labels = 1" in message
    assert "allowed keys: kind, data, num_labels" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID + "epoch: 3\n"))
    assert "cfg.yaml, line 15: epoch = 3" in message
    assert "allowed keys: name, epochs, flag, names, optim, tasks" in message


def test_missing_field_points_at_parent(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("    data: sst2.csv\n", "")))
    assert "cfg.yaml, line 8: tasks.sst2.data is missing: Field required" in message


def test_missing_top_level_field(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "# a comment\nepochs: 2\ntasks: {}\n"))
    assert "cfg.yaml, line 2: name is missing" in message


def test_every_problem_on_its_own_line_without_urls(tmp_path: Path) -> None:
    text = edit("epochs: 2", "epochs: -1").replace("kind: regression", "kind: regr")
    message = config_error(write(tmp_path, text), ["optim.kind=rms"])
    lines = message.splitlines()
    assert "3 problems" in lines[0]
    problems = lines[1:]
    assert len(problems) == 3
    assert all(line.startswith(str(tmp_path / "cfg.yaml")) for line in problems)
    assert any("line 2: epochs = -1" in line for line in problems)
    assert any("line 12: tasks.stsb.kind = 'regr'" in line for line in problems)
    assert any("(from command line): optim.kind = 'rms'" in line for line in problems)
    assert "errors.pydantic.dev" not in message and "further information" not in message


def test_override_errors_say_command_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID), ["epochs=-1", "optim.kind=rms"])
    assert "cfg.yaml (from command line): epochs = -1: Input should be greater than 0" in message
    assert "cfg.yaml (from command line): optim.kind = 'rms': Input should be 'adam' or 'sgd'" in (
        message
    )


def test_override_of_a_replaced_subtree_says_command_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID), ["optim={lr: 0}"])
    assert "(from command line): optim.lr = 0: Input should be greater than 0" in message


def test_missing_field_in_entry_created_by_override(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, VALID), ["tasks.mrpc.kind=classification"])
    assert "cfg.yaml (from command line): tasks.mrpc.data is missing" in message


def test_override_below_file_key_keeps_file_line_for_others(tmp_path: Path) -> None:
    text = edit("kind: regression", "kind: regr")
    message = config_error(write(tmp_path, text), ["tasks.stsb.num_labels=2"])
    assert "cfg.yaml, line 12: tasks.stsb.kind = 'regr'" in message


def test_long_values_are_truncated(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, edit("kind: adam", "kind: " + "z" * 200)))
    line = next(x for x in message.splitlines() if "optim.kind" in x)
    assert "zzz..." in line and "z" * 100 not in line


# --------------------------------------------------------------------------- harder schemas


class Head(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["linear"] = "linear"
    width: int = 1


class Mlp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp"] = "mlp"
    depth: int = 2

    @model_validator(mode="after")
    def _check(self) -> "Mlp":
        return self


class Net(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: list[Head] = []
    head: Union[Head, Mlp] = Head()
    tagged: Union[Head, Mlp] = Field(default=Head(), discriminator="kind")
    maybe: Optional[Head] = None

    @model_validator(mode="after")
    def _not_too_many(self) -> "Net":
        if len(self.heads) > 2:
            raise ValueError("at most 2 heads")
        return self


def test_unknown_key_in_list_of_models(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "heads:\n  - width: 2\n  - widht: 3\n"), model=Net)
    assert "cfg.yaml, line 3: heads[1].widht = 3" in message
    assert "allowed keys: kind, width" in message


def test_unknown_key_in_union_names_each_member(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "head:\n  size: 3\n"), model=Net)
    assert "cfg.yaml, line 2: head.size = 3 (as Head)" in message
    assert "allowed keys: kind, width" in message
    assert "cfg.yaml, line 2: head.size = 3 (as Mlp)" in message  # validator wrapper stripped
    assert "allowed keys: kind, depth" in message


def test_unknown_key_in_discriminated_union(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "tagged:\n  kind: mlp\n  width: 3\n"), model=Net)
    assert "cfg.yaml, line 3: tagged.width = 3" in message
    assert "allowed keys: kind, depth" in message


def test_unknown_key_in_optional_model(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "maybe:\n  depth: 3\n"), model=Net)
    assert "cfg.yaml, line 2: maybe.depth = 3" in message and "allowed keys: kind, width" in message


def test_model_level_validator_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "heads: [{}, {}, {}]\n"), model=Net)
    assert "cfg.yaml, line 1: (top level): Value error, at most 2 heads" in message


# --------------------------------------------------------------------------- dump_config


def test_dump_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        Cfg,
        write(tmp_path, VALID),
        ["optim.lr=1e-7", "names=['1e-4', '3', 'null', 'yes']", "tasks.mrpc={kind: regression, data: m}"],
    )
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert out.read_text(encoding="utf-8").startswith("name: demo\n")  # field order kept
    assert load_config(Cfg, out) == cfg
    assert not [p for p in out.parent.iterdir() if p.name != "config.yaml"]  # no temp files left


def test_dump_config_round_trip_of_union_schema(tmp_path: Path) -> None:
    cfg = Net(heads=[Head(width=3)], head=Mlp(depth=4), tagged=Mlp(), maybe=Head())
    out = tmp_path / "net.yaml"
    dump_config(cfg, out)
    assert load_config(Net, out) == cfg
