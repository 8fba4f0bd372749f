"""Read one split of one task into kdlib's canonical examples table, validating as it goes.

Every problem is a :class:`~kdlib.errors.DataError` naming the file, the line (or row) and
the column, so a user can open the file in an editor and fix it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kdlib import demo
from kdlib.errors import ConfigError, DataError

FORMATS = ("tsv", "csv", "jsonl", "parquet", "hub", "demo")
KINDS = ("classification", "regression")
EXAMPLE_COLUMNS = ("id", "task", "text", "text_pair", "label", "source")

_INT_RE = re.compile(r"[+-]?\d+")

# Builds the DataError for a problem at a row index (None: the whole file) and column.
_Fail = Callable[..., DataError]


@dataclass(frozen=True)
class _Raw:
    """A file's rows before validation, with where each row sits in the file."""

    frame: pd.DataFrame
    lines: np.ndarray  # 1-based line (or row) of each row of `frame`
    line_word: str  # "line" for text formats, "row" for the others


def read_split(*, task: str, split: str, path: str, format: str, text_column: str,
               text_pair_column: str | None, label_column: str | None, kind: str,
               labels: list[str] | None, hub_config: str | None = None
               ) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate one split of a task.

    Args:
        task: Task name; part of every example id.
        split: Split name (``train``, ``dev``, ...); part of every example id and,
            for ``hub``, the split loaded.
        path: File path; for ``hub`` the dataset name, for ``demo`` the demo task name.
        format: One of ``tsv``, ``csv``, ``jsonl``, ``parquet``, ``hub``, ``demo``.
        text_column: Column holding the text.
        text_pair_column: Column holding the second text of pair tasks, or None.
        label_column: Column holding the label, or None for unlabeled data.
        kind: ``classification`` or ``regression``.
        labels: The declared label set of a classification task (label id = index),
            or None to infer it as the sorted unique labels of this split.
        hub_config: Config name for ``hub`` datasets.

    Returns:
        ``(examples, label_names)``: ``examples`` has the columns ``id``, ``task``,
        ``text``, ``text_pair`` (None for single-text tasks), ``label`` (int64 label id
        for classification, float64 for regression, all NaN when unlabeled) and
        ``source`` (``"original"``); ``label_names`` is the label set (``[]`` for
        regression; the declared set when ``labels`` is given).

    Raises:
        DataError: The data is missing, malformed or does not match the task.
        ConfigError: ``format``, ``kind`` or ``labels`` is invalid.
    """
    path = os.fspath(path)  # a pathlib.Path works too, and errors show it as text
    if kind not in KINDS:
        raise ConfigError(f"task {task!r}: unknown kind {kind!r}; expected one of {list(KINDS)}")
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(set(labels)) != len(labels) or not labels:
            raise ConfigError(f"task {task!r}: labels must be distinct and non-empty, got {labels}")

    raw = _load(path=path, format=format, split=split, hub_config=hub_config)
    frame = raw.frame

    def fail(message: str, row: int | None = None, column: str | None = None) -> DataError:
        line = None if row is None else int(raw.lines[row])
        return DataError(message, path=path, line=line, column=column, line_word=raw.line_word)

    if len(frame) == 0:
        raise fail("no examples")
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    for column in wanted:
        if column not in frame.columns:
            present = ", ".join(repr(str(c)) for c in frame.columns)
            raise fail(f"no column {column!r}; the columns are: {present}")

    text = _check_text(frame[text_column], text_column, fail)
    pair = _check_text(frame[text_pair_column], text_pair_column, fail) if text_pair_column else None

    label_names: list[str] = []
    if label_column is None:
        label = pd.Series(np.full(len(frame), np.nan), dtype="float64")
    elif kind == "classification":
        label, label_names = _class_labels(frame[label_column], label_column, labels, fail)
    else:
        label = _regression_targets(frame[label_column], label_column, fail)

    examples = pd.DataFrame({
        "id": _example_ids(task, split, text, pair),
        "task": task,
        "text": text.to_numpy(dtype=object),
        "text_pair": (pair.to_numpy(dtype=object) if pair is not None
                      else np.full(len(frame), None, dtype=object)),
        "label": label.to_numpy(),
        "source": "original",
    }, columns=list(EXAMPLE_COLUMNS))
    return examples, label_names


def _load(*, path: str, format: str, split: str, hub_config: str | None) -> _Raw:
    """Load the raw rows of one split, every failure turned into a DataError."""
    if format in ("tsv", "csv", "jsonl", "parquet") and not os.path.isfile(path):
        raise DataError("file not found", path=path)
    if format == "tsv":
        return _read_delimited(path, delimiter="\t", quoting=csv.QUOTE_NONE)
    if format == "csv":
        return _read_delimited(path, delimiter=",", quoting=csv.QUOTE_MINIMAL)
    if format == "jsonl":
        return _read_jsonl(path)
    if format == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
            raise DataError(f"cannot read as parquet: {e}", path=path) from e
        return _by_row(frame)
    if format == "hub":
        return _by_row(_load_hub(path, hub_config, split))
    if format == "demo":
        if path not in demo.DEMO_TASKS:
            raise DataError(f"unknown demo task; the demo tasks are: {', '.join(demo.DEMO_TASKS)}",
                            path=path)
        if split not in demo.DEMO_SPLITS:
            raise DataError(f"demo tasks have no split {split!r}; they have: "
                            f"{', '.join(demo.DEMO_SPLITS)}", path=path)
        return _by_row(demo.generate(path, split))
    raise ConfigError(f"unknown data format {format!r}; expected one of {list(FORMATS)}")


def _by_row(frame: pd.DataFrame) -> _Raw:
    """Wrap a table without lines; its rows are numbered 1, 2, ..."""
    frame = frame.reset_index(drop=True)
    return _Raw(frame, np.arange(1, len(frame) + 1), "row")


def _load_hub(path: str, hub_config: str | None, split: str) -> pd.DataFrame:
    try:
        import datasets  # optional dependency, only needed here
    except ImportError as e:
        raise DataError("reading Hugging Face Hub datasets needs the `datasets` package: "
                        "pip install kdlib[hub]", path=path) from e
    try:
        dataset = datasets.load_dataset(path, hub_config, split=split)
    except Exception as e:  # network, auth and naming problems all surface here
        raise DataError(f"cannot load hub dataset (config {hub_config!r}, split {split!r}): {e}",
                        path=path) from e
    return dataset.to_pandas()


def _read_delimited(path: str, *, delimiter: str, quoting: int) -> _Raw:
    """Read a tsv/csv file with the csv module, which tells the line of every row.

    pandas silently pads short rows with NaN; reading it ourselves lets a row with the
    wrong number of fields fail with its line, and keeps line numbers right when a
    quoted csv field spans several lines.
    """
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        # utf-8-sig: a BOM left by spreadsheet programs would otherwise end up in the
        # first column's name and make it "missing".
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
            header = None
            start = 1
            for fields in reader:
                if fields:  # blank lines are skipped, but they still count as lines
                    if header is None:
                        header = fields
                        if len(set(header)) != len(header):
                            raise DataError(f"duplicate column names in the header: {header}",
                                            path=path, line=start)
                    elif len(fields) != len(header):
                        raise DataError(f"expected {len(header)} fields (as in the header), "
                                        f"found {len(fields)}", path=path, line=start)
                    else:
                        rows.append(fields)
                        lines.append(start)
                start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"malformed {'tsv' if delimiter == chr(9) else 'csv'}: {e}",
                        path=path, line=start) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", path=path) from e
    if header is None:
        raise DataError("empty file; expected a header row", path=path, line=1)
    frame = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header)
    return _Raw(frame, np.asarray(lines, dtype=np.int64), "line")


def _read_jsonl(path: str) -> _Raw:
    """Read one JSON object per line; blank lines are skipped but counted."""
    records: list[dict] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON: {e.msg} (character {e.pos + 1})",
                                    path=path, line=number) from e
                if not isinstance(record, dict):
                    raise DataError(f"expected a JSON object, found {type(record).__name__}",
                                    path=path, line=number)
                records.append(record)
                lines.append(number)
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", path=path) from e
    # A key missing from some objects becomes a null there and fails as a missing value.
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    return _Raw(frame, np.asarray(lines, dtype=np.int64), "line")


def _first(mask: np.ndarray) -> tuple[int, str]:
    """Index of the first True in `mask`, and a note on how many more there are."""
    hits = np.flatnonzero(mask)
    more = f" ({len(hits)} rows have this problem)" if len(hits) > 1 else ""
    return int(hits[0]), more


def _check_text(values: pd.Series, column: str, fail: _Fail) -> pd.Series:
    """Check a text column holds non-blank strings only; returns it as object strings."""
    values = values.reset_index(drop=True)
    missing = values.isna().to_numpy()
    if missing.any():
        row, more = _first(missing)
        raise fail(f"missing text{more}", row, column)
    # infer_dtype scans in C; the per-value look only runs to find the culprit.
    not_str = (np.zeros(len(values), dtype=bool) if pd.api.types.infer_dtype(values, skipna=True) == "string"
               else np.fromiter((not isinstance(v, str) for v in values), bool, len(values)))
    if not_str.any():
        row, more = _first(not_str)
        bad = values.iloc[row]
        raise fail(f"expected text, found {bad!r} ({type(bad).__name__}){more}", row, column)
    values = values.astype(object)
    blank = (values.str.strip() == "").to_numpy(dtype=bool)
    if blank.any():
        row, more = _first(blank)
        raise fail(f"empty text{more}", row, column)
    return values


def _label_strings(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Labels as the strings a person would write, and which ones are missing.

    Ints and integral floats (parquet/jsonl turn an int column with nulls into floats)
    read as "1", so a file's ``1`` and ``1.0`` both match a declared label ``1``.
    """
    if pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_integer_dtype(values.dtype):
        missing = values.isna().to_numpy(dtype=bool)
        return values.astype(object).map(str).to_numpy(dtype=object), missing
    if pd.api.types.infer_dtype(values, skipna=True) == "string":  # tsv/csv: the fast path
        stripped = values.astype(object).str.strip()
        missing = (stripped.isna() | (stripped == "")).to_numpy(dtype=bool)
        return stripped.to_numpy(dtype=object), missing
    strings = np.empty(len(values), dtype=object)
    missing = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values.to_numpy(dtype=object)):
        if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and np.isnan(v)):
            missing[i] = True
        elif isinstance(v, str):
            strings[i] = v.strip()
            missing[i] = not strings[i]
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            strings[i] = str(int(v))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            strings[i] = str(int(v))
        else:
            strings[i] = str(v)
    return strings, missing


def _sort_labels(names: set[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else text order."""
    if all(_INT_RE.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _class_labels(values: pd.Series, column: str, declared: list[str] | None, fail: _Fail
                  ) -> tuple[pd.Series, list[str]]:
    """Map classification labels to ids in the declared (or inferred) label set."""
    strings, missing = _label_strings(values.reset_index(drop=True))
    if missing.any():
        row, more = _first(missing)
        raise fail(f"missing label{more}", row, column)
    names = declared if declared is not None else _sort_labels(set(strings))
    ids = pd.Series(strings).map({name: i for i, name in enumerate(names)})
    unknown = ids.isna().to_numpy()
    if unknown.any():
        row, more = _first(unknown)
        raise fail(f"label {strings[row]!r} is not one of the declared labels {names}{more}",
                   row, column)
    return ids.astype("int64"), list(names)


def _regression_targets(values: pd.Series, column: str, fail: _Fail) -> pd.Series:
    """Parse regression targets as finite floats."""
    values = values.reset_index(drop=True)
    strings, missing = _label_strings(values)
    if missing.any():
        row, more = _first(missing)
        raise fail(f"missing label{more}", row, column)
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.astype("float64").to_numpy()
    else:
        # bools are not numbers here; the strings route rejects them as non-numeric
        numbers = pd.to_numeric(pd.Series(strings), errors="coerce").astype("float64").to_numpy()
    bad = ~np.isfinite(numbers)
    if bad.any():
        row, more = _first(bad)
        raise fail(f"regression label {strings[row]!r} is not a finite number{more}", row, column)
    return pd.Series(numbers, dtype="float64")


def _example_ids(task: str, split: str, text: pd.Series, pair: pd.Series | None) -> list[str]:
    """Ids stable under reordering: a hash of the inputs and the occurrence number of
    identical inputs, so duplicated rows still get distinct ids."""
    pairs = pair.to_numpy(dtype=object) if pair is not None else [""] * len(text)
    seen: dict[str, int] = {}
    ids = []
    for t, p in zip(text.to_numpy(dtype=object), pairs):
        key = f"{task}\x1f{split}\x1f{t}\x1f{p}"
        k = seen.get(key, 0)
        seen[key] = k + 1
        ids.append(hashlib.sha1(f"{key}\x1f{k}".encode()).hexdigest()[:16])
    return ids
