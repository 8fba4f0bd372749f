"""read_split on every format, and every bad input failing with file, line and column."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys

import numpy as np
import pandas as pd
import pytest

from kdlib.errors import ConfigError, DataError
from kdlib.readers import EXAMPLE_COLUMNS, read_split


def read(path, fmt, **kw):
    """read_split with single-sentence classification defaults."""
    args = dict(task="t", split="train", path=str(path), format=fmt, text_column="sentence",
                text_pair_column=None, label_column="label", kind="classification", labels=None)
    args.update(kw)
    return read_split(**args)


def write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def fails(path, fmt, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        read(path, fmt, **kw)
    return info.value


# --- the DataError itself ------------------------------------------------------------

def test_data_error_reads_file_line_column():
    err = DataError("empty text", path="data/sst2/train.tsv", line=17, column="sentence")
    assert str(err) == "data/sst2/train.tsv, line 17, column 'sentence': empty text"
    assert (err.path, err.line, err.column) == ("data/sst2/train.tsv", 17, "sentence")
    assert str(DataError("file not found", path="x.tsv")) == "x.tsv: file not found"
    assert str(DataError("bad", path="x.parquet", line=3, line_word="row")) == "x.parquet, row 3: bad"


def test_data_error_survives_pickling():
    # Ray pickles errors raised in workers; the location must come through.
    err = pickle.loads(pickle.dumps(DataError("empty text", path="a.tsv", line=4, column="s")))
    assert isinstance(err, DataError)
    assert (err.path, err.line, err.column, str(err)) == ("a.tsv", 4, "s", "a.tsv, line 4, column 's': empty text")


# --- formats -----------------------------------------------------------------------

def test_tsv_reads_unbalanced_quotes_verbatim(tmp_path):
    path = write(tmp_path, "train.tsv", 'sentence\tlabel\nhe said "hi\t1\n"quoted" start\t0\nplain\t1\n')
    examples, names = read(path, "tsv")
    assert list(examples["text"]) == ['he said "hi', '"quoted" start', "plain"]
    assert list(examples["label"]) == [1, 0, 1]
    assert names == ["0", "1"]


def test_output_columns_and_types(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\tother\na\tpos\tx\nb\tneg\ty\n")
    examples, names = read(path, "tsv")
    assert tuple(examples.columns) == EXAMPLE_COLUMNS
    assert examples["label"].dtype == np.int64
    assert names == ["neg", "pos"]
    assert list(examples["label"]) == [1, 0]
    assert examples["text_pair"].isna().all() and list(examples["text_pair"]) == [None, None]
    assert set(examples["source"]) == {"original"} and set(examples["task"]) == {"t"}
    assert all(isinstance(v, str) for v in examples["text"])


def test_tsv_keeps_values_as_text(tmp_path):
    # "NA" and "007" must not become NaN and 7.
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nNA\t007\n1.50\t007\n")
    examples, names = read(path, "tsv")
    assert list(examples["text"]) == ["NA", "1.50"]
    assert names == ["007"]


def test_csv_quoting_and_multiline_fields(tmp_path):
    path = write(tmp_path, "train.csv",
                 'sentence,label\n"a, b",1\n"two\nlines",0\n"say ""hi""",1\n')
    examples, _ = read(path, "csv")
    assert list(examples["text"]) == ["a, b", "two\nlines", 'say "hi"']
    # After the two-line record, the editor's line numbers run one ahead of the row count.
    bad = write(tmp_path, "bad.csv", 'sentence,label\n"two\nlines",0\n" ",1\n')
    err = fails(bad, "csv")
    assert (err.line, err.column) == (4, "sentence")


def test_utf8_bom_does_not_hide_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("sentence,label\nhé,1\n".encode("utf-8-sig"))
    examples, _ = read(path, "csv")
    assert list(examples["text"]) == ["hé"]


def test_jsonl_int_labels_and_blank_lines(tmp_path):
    lines = [json.dumps({"sentence": "a", "label": 1}), "", json.dumps({"sentence": "b", "label": 0}),
             "   ", json.dumps({"sentence": "c", "label": 2})]
    path = write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    examples, names = read(path, "jsonl")
    assert names == ["0", "1", "2"]
    assert list(examples["label"]) == [1, 0, 2]
    assert list(examples["text"]) == ["a", "b", "c"]


def test_jsonl_errors_name_the_raw_line(tmp_path):
    ok = json.dumps({"sentence": "a", "label": 1})
    path = write(tmp_path, "bad.jsonl", f"{ok}\n\n{ok}\n{{\"sentence\": \"x\", \n")
    err = fails(path, "jsonl")
    assert err.line == 4 and "malformed JSON" in str(err) and "bad.jsonl, line 4" in str(err)
    path = write(tmp_path, "list.jsonl", f"{ok}\n[1, 2]\n")
    assert "expected a JSON object" in str(fails(path, "jsonl")) and fails(path, "jsonl").line == 2
    # A key missing on one line is a missing value on that line.
    path = write(tmp_path, "nolabel.jsonl", f"{ok}\n\n{json.dumps({'sentence': 'b'})}\n")
    err = fails(path, "jsonl")
    assert (err.line, err.column) == (3, "label") and "missing label" in str(err)


def test_parquet_numeric_labels_and_row_numbers(tmp_path):
    path = tmp_path / "train.parquet"
    # A float label column holding whole numbers (what an int column with nulls turns into).
    pd.DataFrame({"sentence": ["a", "b", "c"], "label": [1.0, 0.0, 1.0]}).to_parquet(path)
    examples, names = read(path, "parquet", labels=["1", "0"])
    assert names == ["1", "0"]
    assert list(examples["label"]) == [0, 1, 0]
    pd.DataFrame({"sentence": ["a", "b", " "], "label": [3, 1, 2]}).to_parquet(path)
    err = fails(path, "parquet")
    assert str(err) == f"{path}, row 3, column 'sentence': empty text"


def test_pairs_and_declared_labels(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"s1": "a", "s2": "b", "y": "entailment"}, {"s1": "c", "s2": "d", "y": "contradiction"},
        {"s1": "e", "s2": "f", "y": "neutral"}]))
    examples, names = read(path, "jsonl", text_column="s1", text_pair_column="s2", label_column="y",
                           labels=["entailment", "neutral", "contradiction"])
    assert names == ["entailment", "neutral", "contradiction"]
    assert list(examples["label"]) == [0, 2, 1]
    assert list(examples["text_pair"]) == ["b", "d", "f"]


def test_inferred_labels_sort_numerically_when_integers(tmp_path):
    rows = "".join(f"s{i}\t{v}\n" for i, v in enumerate(["10", "2", "-1", "2"]))
    examples, names = read(write(tmp_path, "a.tsv", "sentence\tlabel\n" + rows), "tsv")
    assert names == ["-1", "2", "10"]
    assert list(examples["label"]) == [2, 1, 0, 1]
    rows = "".join(f"s{i}\t{v}\n" for i, v in enumerate(["b", "B", "a", "10"]))
    _, names = read(write(tmp_path, "b.tsv", "sentence\tlabel\n" + rows), "tsv")
    assert names == ["10", "B", "a", "b"]


def test_regression_targets(tmp_path):
    path = write(tmp_path, "sts.tsv", "sentence\tscore\na\t3.5\nb\t0\nc\t5.0\n")
    examples, names = read(path, "tsv", label_column="score", kind="regression")
    assert names == []
    assert examples["label"].dtype == np.float64
    assert list(examples["label"]) == [3.5, 0.0, 5.0]


@pytest.mark.parametrize("value", ["high", "nan", "inf", "-Infinity"])
def test_regression_rejects_non_finite_targets(tmp_path, value):
    path = write(tmp_path, "sts.tsv", f"sentence\tscore\na\t1\nb\t{value}\n")
    err = fails(path, "tsv", label_column="score", kind="regression")
    assert (err.path, err.line, err.column) == (path, 3, "score")
    assert repr(value) in str(err) and "not a finite number" in str(err)


def test_regression_rejects_nan_in_parquet(tmp_path):
    path = tmp_path / "sts.parquet"
    pd.DataFrame({"sentence": ["a", "b"], "score": [1.0, np.inf]}).to_parquet(path)
    err = fails(path, "parquet", label_column="score", kind="regression")
    assert (err.line, err.column) == (2, "score") and "row 2" in str(err)
    pd.DataFrame({"sentence": ["a", "b"], "score": [np.nan, 1.0]}).to_parquet(path)
    err = fails(path, "parquet", label_column="score", kind="regression")
    assert (err.line, err.column) == (1, "score") and "missing label" in str(err)


def test_unlabeled_split(tmp_path):
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\ta\n1\tb\n")
    for kind in ("classification", "regression"):
        examples, names = read(path, "tsv", label_column=None, kind=kind)
        assert examples["label"].isna().all() and len(examples) == 2
        assert names == []


# --- bad input -----------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.tsv")
    err = fails(path, "tsv")
    assert err.line is None and str(err) == f"{path}: file not found"


def test_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path, "a.tsv", "text\tlabel\na\t1\n")
    err = fails(path, "tsv")
    # the header row's values are names, so no hint about header: false
    assert str(err) == f"{path}, line 1, column 'sentence': not found (columns: 'text', 'label')"


@pytest.mark.parametrize("cell", ["", "   "])
def test_empty_text(tmp_path, cell):
    path = write(tmp_path, "a.tsv", f"sentence\tlabel\na\t1\nb\t0\n{cell}\t1\n")
    err = fails(path, "tsv")
    assert str(err) == f"{path}, line 4, column 'sentence': empty text"


def test_empty_text_pair(tmp_path):
    path = write(tmp_path, "a.tsv", "s1\ts2\tlabel\na\tb\t1\nc\t \t0\n")
    err = fails(path, "tsv", text_column="s1", text_pair_column="s2")
    assert (err.line, err.column) == (3, "s2") and "empty text" in str(err)


def test_blank_lines_count_toward_line_numbers(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\n\n\t1\n")
    assert fails(path, "tsv").line == 4


def test_many_bad_rows_say_how_many(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\n\t1\n\t0\n")
    err = fails(path, "tsv")
    assert err.line == 3 and "2 rows have this problem" in str(err)


def test_non_text_value_in_text_column(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"sentence": "a", "label": 1}) + "\n" + json.dumps({"sentence": 5, "label": 1}))
    err = fails(path, "jsonl")
    assert (err.line, err.column) == (2, "sentence") and "expected text" in str(err)


def test_label_outside_declared_set(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\tpositive\nb\tneutral\n")
    err = fails(path, "tsv", labels=["negative", "positive"])
    assert (err.path, err.line, err.column) == (path, 3, "label")
    assert "'neutral'" in str(err) and "['negative', 'positive']" in str(err)


def test_missing_label(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\nb\t\n")
    err = fails(path, "tsv")
    assert str(err) == f"{path}, line 3, column 'label': missing label"


def test_wrong_number_of_fields(tmp_path):
    # An unquoted tab inside the text splits it into too many fields.
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\nb\tc\t1\nd\t0\n")
    err = fails(path, "tsv")
    assert err.line == 3 and "expected 2 fields" in str(err) and "found 3" in str(err)
    path = write(tmp_path, "b.tsv", "sentence\tlabel\na\t1\nb\n")
    assert fails(path, "tsv").line == 3


def test_empty_files(tmp_path):
    assert "empty file" in str(fails(write(tmp_path, "a.tsv", ""), "tsv"))
    assert "no examples" in str(fails(write(tmp_path, "b.tsv", "sentence\tlabel\n"), "tsv"))
    assert "no examples" in str(fails(write(tmp_path, "c.jsonl", "\n\n"), "jsonl"))


def test_not_a_parquet_file(tmp_path):
    path = write(tmp_path, "a.parquet", "sentence\tlabel\n")
    assert "cannot read as parquet" in str(fails(path, "parquet"))


def test_hub_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    err = fails("glue", "hub", hub_config="sst2")
    assert "pip install kdlib[hub]" in str(err)


def test_bad_config_values(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(ConfigError, match="unknown data format 'xlsx'"):
        read(path, "xlsx")
    with pytest.raises(ConfigError, match="unknown kind"):
        read(path, "tsv", kind="ranking")
    with pytest.raises(ConfigError, match="distinct"):
        read(path, "tsv", labels=["1", "1"])


# --- files without a header row -----------------------------------------------------

TOPICS = "stocks fell sharply today\tbusiness\nthe striker scored twice\tsport\nnew phone chips are faster\ttech\n"


def test_headerless_tsv_reads_columns_by_position(tmp_path):
    path = write(tmp_path, "topics.tsv", TOPICS)
    examples, names = read(path, "tsv", header=False, text_column=0, label_column=1)
    # the first line is an example, not a header
    assert list(examples["text"]) == ["stocks fell sharply today", "the striker scored twice",
                                      "new phone chips are faster"]
    assert names == ["business", "sport", "tech"] and list(examples["label"]) == [0, 1, 2]
    # the same file read with a header row would lose its first example; positions map the same columns
    with_header, _ = read(path, "tsv", text_column=0, label_column=1)
    assert list(with_header["text"]) == list(examples["text"])[1:]


def test_headerless_csv_pair_task_with_the_label_first(tmp_path):
    path = write(tmp_path, "nli.csv", 'entailment,"a man, sleeping",a person rests\ncontradiction,a cat,a dog\n')
    examples, _ = read(path, "csv", header=False, text_column=1, text_pair_column=2, label_column=0,
                       labels=["entailment", "contradiction"])
    assert list(examples["text"]) == ["a man, sleeping", "a cat"]
    assert list(examples["text_pair"]) == ["a person rests", "a dog"] and list(examples["label"]) == [0, 1]
    # errors in a headerless file name the column by its position, and lines count from the first example
    bad = write(tmp_path, "bad.csv", "entailment,a,b\ncontradiction, ,d\n")
    err = fails(bad, "csv", header=False, text_column=1, text_pair_column=2, label_column=0)
    assert str(err) == f"{bad}, line 2, column 1: empty text"


def test_positions_with_a_header_row_name_the_column_in_errors(tmp_path):
    path = write(tmp_path, "a.tsv", "review\tstars\ngood\t5\n\t1\n")
    err = fails(path, "tsv", text_column=0, label_column=1)
    assert str(err) == f"{path}, line 3, column 'review': empty text"


def test_a_header_row_that_looks_like_data_suggests_header_false(tmp_path):
    path = write(tmp_path, "sst.tsv", "the film was great\tpos\nawful acting\tneg\nloved it\tpos\n")
    err = fails(path, "tsv")
    assert str(err) == (
        f"{path}, line 1, column 'sentence': not found (columns: 'the film was great', 'pos'); the first row "
        "looks like data: if the file has no header row, set tasks.t.header: false and give columns by "
        "position (text_column: 0, label_column: 1)")
    # the label found first in the row (it repeats further down its column) gets its position
    path = write(tmp_path, "first.tsv", "1\tgreat film\n0\tbad film\n")
    assert "(text_column: 1, label_column: 0)" in str(fails(path, "tsv", task="mood"))
    assert "tasks.mood.header: false" in str(fails(path, "tsv", task="mood"))
    # a declared label in the header row is enough; so is a pair task's sentence
    path = write(tmp_path, "pair.csv", "a dog runs,a cat sleeps,neutral\nx,y,entailment\n")
    err = fails(path, "csv", text_column="premise", text_pair_column="hypothesis",
                labels=["entailment", "neutral"])
    assert "(text_column: 0, text_pair_column: 1, label_column: 2)" in str(err)


@pytest.mark.parametrize("header", ["text\tcategory", "sentence\ttopic", "text\tlabel"])
def test_a_header_row_of_names_gets_no_header_hint(tmp_path, header):
    # names that do not match (or match in part) are a naming mistake, not a missing header row
    path = write(tmp_path, "a.tsv", f"{header}\na film\tpos\n")
    assert "header: false" not in str(fails(path, "tsv"))


def test_a_header_row_read_as_an_example_is_pointed_out(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na film\tpos\n")
    err = fails(path, "tsv", header=False, text_column=0, label_column=1, labels=["neg", "pos"])
    assert str(err) == (f"{path}, line 1, column 1: label 'label' is not one of the declared labels "
                        "['neg', 'pos']; line 1 looks like a header row: if the file has one, set "
                        "tasks.t.header: true (the column positions still work)")
    err = fails(path, "tsv", header=False, text_column=0, label_column=1, kind="regression")
    assert (err.line, err.column) == (1, 1) and "looks like a header row" in str(err)


def test_header_and_positions_apply_to_tsv_and_csv_only(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"sentence": "a", "label": 1}) + "\n")
    with pytest.raises(ConfigError, match="header: false applies to tsv and csv files, not jsonl"):
        read(path, "jsonl", header=False)
    with pytest.raises(ConfigError, match="label_column is 1; jsonl columns are given by name"):
        read(path, "jsonl", label_column=1)
    tsv = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(ConfigError, match="text_column and label_column are the same column 'sentence'"):
        read(tsv, "tsv", label_column=0)


# --- broken files, one per row: each a DataError naming file, line (or row) and column --

def _frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


_OK = json.dumps({"sentence": "a", "label": 1})
_REG = {"kind": "regression", "label_column": "score"}
_PAIR = {"text_column": "s1", "text_pair_column": "s2"}
_HEADERLESS = {"header": False, "text_column": 0, "label_column": 1}

# (file name, content, read_split arguments, line or row, column, what the message says).
# content: text, bytes, a DataFrame (written as parquet), None (no file) or "<folder>".
BROKEN = {
    "missing file": ("a.tsv", None, {}, None, None, "file not found"),
    "a folder": ("a.tsv", "<folder>", {}, None, None, "is a folder; expected a file"),
    "empty tsv": ("a.tsv", "", {}, 1, None, "empty file; expected a header row"),
    "empty headerless tsv": ("a.tsv", "\n", _HEADERLESS, 1, None, "empty file"),
    "header only": ("a.tsv", "sentence\tlabel\n", {}, 1, None, "no examples: the file has a header row only"),
    "missing column": ("a.tsv", "text\tlabel\na\t1\n", {}, 1, "sentence", "not found (columns: 'text', 'label')"),
    "too many fields": ("a.tsv", "sentence\tlabel\na\t1\nb\tc\t1\n", {}, 3, None,
                        "expected 2 fields (as in the header), found 3"),
    "too few fields": ("a.csv", "sentence,label\na,1\n\nb\n", {}, 4, None,
                       "expected 2 fields (as in the header), found 1"),
    "duplicate column names": ("a.csv", "sentence,label,label\na,1,2\n", {}, 1, None, "duplicate column names"),
    "unterminated quote": ("a.csv", 'sentence,label\na,1\n"b,0\nc,1\n', {}, 3, None,
                           "a quoted field that starts on this line is never closed"),
    "stray quote": ("a.csv", 'sentence,label\na,1\n"b"c,0\n', {}, 3, None, "must be doubled"),
    "empty text": ("a.tsv", "sentence\tlabel\na\t1\n \t0\n", {}, 3, "sentence", "empty text"),
    "empty label": ("a.csv", "sentence,label\na,1\nb,\n", {}, 3, "label", "missing label"),
    "label not declared": ("a.tsv", "sentence\tlabel\na\tpos\nb\tmeh\n", {"labels": ["neg", "pos"]}, 3, "label",
                           "label 'meh' is not one of the declared labels ['neg', 'pos']"),
    "non-numeric regression label": ("a.tsv", "sentence\tscore\na\t1\nb\thigh\n", _REG, 3, "score",
                                     "regression label 'high' is not a finite number"),
    "infinite regression label": ("a.csv", "sentence,score\na,inf\n", _REG, 2, "score", "not a finite number"),
    "pair missing": ("a.tsv", "s1\ts2\tlabel\na\tb\t1\nc\t\t0\n", _PAIR, 3, "s2", "empty text"),
    "invalid UTF-8 in text": ("a.tsv", b"sentence\tlabel\na\t1\nb\xff\t0\n", {}, 3, "sentence",
                              "not UTF-8 text: byte 0xff at character 2 of the line"),
    "invalid UTF-8 in label": ("a.tsv", b"sentence\tlabel\na\t1\xe9\n", {}, 2, "label", "not UTF-8"),
    "invalid UTF-8 headerless": ("a.tsv", b"a\t1\nb\t\xc3\n", _HEADERLESS, 2, 1, "not UTF-8"),
    "headerless too few columns": ("a.tsv", "a\t1\n", {**_HEADERLESS, "label_column": 2}, 1, 2,
                                   "not found: the lines have 2 fields, so label_column can be 0 to 1"),
    "headerless ragged line": ("a.tsv", "a\t1\nb\t0\t1\n", _HEADERLESS, 2, None,
                               "expected 2 fields (as on line 1, the first), found 3"),
    "position past the header": ("a.csv", "sentence,label\na,1\n", {"label_column": 5}, 1, 5,
                                 ("not found: the header row has 2 columns ('sentence', 'label'), "
                                  "so label_column can be 0 to 1")),
    "jsonl not JSON": ("a.jsonl", f"{_OK}\n{{'sentence': 'b'}}\n", {}, 2, None, "malformed JSON"),
    "jsonl not an object": ("a.jsonl", f'{_OK}\n"b"\n', {}, 2, None, "expected a JSON object, found str"),
    "jsonl missing key": ("a.jsonl", f'{_OK}\n\n{{"sentence": "b"}}\n', {}, 3, "label", "missing label"),
    "jsonl key on no line": ("a.jsonl", '{"sentence": "a", "y": 1}\n', {}, None, "label",
                             "no line has this key (keys: 'sentence', 'y')"),
    "jsonl duplicate key": ("a.jsonl", '{"sentence": "a", "label": 1, "label": 2}\n', {}, 1, "label",
                            "the key appears twice in this object"),
    "jsonl null text": ("a.jsonl", f'{_OK}\n{{"sentence": null, "label": 0}}\n', {}, 2, "sentence", "missing text"),
    "jsonl list label": ("a.jsonl", f'{_OK}\n{{"sentence": "b", "label": [0, 1]}}\n', {}, 2, "label",
                         "expected a label (text or a number), found [0, 1] (list)"),
    "jsonl NaN regression label": ("a.jsonl", '{"sentence": "a", "score": NaN}\n', _REG, 1, "score",
                                   "missing label"),
    "jsonl invalid UTF-8": ("a.jsonl", _OK.encode() + b'\n{"sentence": "\xff"}\n', {}, 2, None, "not UTF-8"),
    "jsonl empty": ("a.jsonl", "\n\n", {}, None, None, "no examples"),
    "parquet not parquet": ("a.parquet", "sentence\tlabel\na\t1\n", {}, None, None,
                            "cannot read as parquet (not a Parquet file, or a damaged one)"),
    "parquet empty file": ("a.parquet", "", {}, None, None, "cannot read as parquet"),
    "parquet missing column": ("a.parquet", _frame(sentence=["a"], y=[1]), {}, None, "label",
                               "not found (columns: 'sentence', 'y')"),
    "parquet no rows": ("a.parquet", _frame(sentence=pd.Series([], dtype=str), label=pd.Series([], dtype=int)),
                        {}, None, None, "no examples"),
    "parquet int text column": ("a.parquet", _frame(sentence=[1, 2], label=[0, 1]), {}, 1, "sentence",
                                "expected text, found 1 (int"),
    "parquet list label column": ("a.parquet", _frame(sentence=["a", "b"], label=[[0], [1]]), {}, 1, "label",
                                  "expected a label (text or a number)"),
    "parquet NaN label": ("a.parquet", _frame(sentence=["a", "b"], label=[1.0, np.nan]), {}, 2, "label",
                          "missing label"),
    "parquet text regression label": ("a.parquet", _frame(sentence=["a", "b"], score=["1.5", "high"]), _REG, 2,
                                      "score", "regression label 'high' is not a finite number"),
    "parquet infinite regression label": ("a.parquet", _frame(sentence=["a", "b"], score=[np.inf, 1.0]), _REG,
                                          1, "score", "not a finite number"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_fail_naming_file_line_and_column(tmp_path, name):
    file_name, content, kwargs, line, column, says = BROKEN[name]
    path = tmp_path / file_name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "<folder>":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    fmt = file_name.rsplit(".", 1)[1]
    err = fails(path, fmt, **kwargs)  # a DataError: no pandas, pyarrow, json or codec exception gets out
    word = "row" if fmt == "parquet" else "line"
    where = str(path) + (f", {word} {line}" if line is not None else "") + \
        (f", column {column!r}" if column is not None else "")
    assert (err.path, err.line, err.column) == (str(path), line, column)
    assert str(err).startswith(where + ": ") and says in err.reason, str(err)


# --- ids -----------------------------------------------------------------------------

def _expected_id(task, split, text, pair, k):
    return hashlib.sha1(f"{task}\x1f{split}\x1f{text}\x1f{pair}\x1f{k}".encode()).hexdigest()[:16]


def test_ids_follow_the_formula(tmp_path):
    path = write(tmp_path, "a.tsv", "s1\ts2\tlabel\nx\ty\t1\n")
    examples, _ = read(path, "tsv", task="mrpc", split="dev", text_column="s1", text_pair_column="s2")
    assert examples["id"][0] == _expected_id("mrpc", "dev", "x", "y", 0)
    examples, _ = read(path, "tsv", task="mrpc", split="dev", text_column="s1")
    assert examples["id"][0] == _expected_id("mrpc", "dev", "x", "", 0)


def test_ids_unique_for_duplicates_and_stable_under_reordering(tmp_path):
    rows = [("a", "1"), ("b", "0"), ("a", "1"), ("c", "1"), ("a", "0")]
    path = write(tmp_path, "a.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    examples, _ = read(path, "tsv")
    assert examples["id"].is_unique
    shuffled = [rows[i] for i in (3, 4, 1, 0, 2)]
    path2 = write(tmp_path, "b.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in shuffled))
    examples2, _ = read(path2, "tsv")
    assert set(examples2["id"]) == set(examples["id"])
    # A non-duplicated row keeps exactly its id wherever it moves.
    assert (examples.set_index("text").loc["c", "id"] == examples2.set_index("text").loc["c", "id"])
    # Another split of the same task gets other ids.
    examples3, _ = read(path, "tsv", split="dev")
    assert not set(examples3["id"]) & set(examples["id"])
