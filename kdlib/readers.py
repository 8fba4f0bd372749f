"""Read one split of one task into kdlib's canonical examples table, validating as it goes.

Every problem is a :class:`~kdlib.errors.DataError` naming the file, the line (or row) and
the column, so a user can open the file in an editor and fix it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
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
DELIMITED = ("tsv", "csv")  # the formats with a header row (or none: header=False) and column positions
KINDS = ("classification", "regression")
EXAMPLE_COLUMNS = ("id", "task", "text", "text_pair", "label", "source")

_INT_RE = re.compile(r"[+-]?\d+")

# Builds the DataError for a problem at a row index (None: the whole file) and column.
_Fail = Callable[..., DataError]


@dataclass(frozen=True)
class _Raw:
    """A file's rows before validation, with where each row sits in the file."""

    frame: pd.DataFrame  # tsv/csv without a header row: the columns are the positions 0, 1, ...
    lines: np.ndarray  # 1-based line (or row) of each row of `frame`
    line_word: str  # "line" for text formats, "row" for the others
    header_line: int | None = None  # tsv/csv: the line of the header row
    headerless: bool = False  # tsv/csv read with header=False


def read_split(*, task: str, split: str, path: str, format: str, text_column: str | int,
               text_pair_column: str | int | None, label_column: str | int | None, kind: str,
               labels: list[str] | None, header: bool = True, hub_config: str | None = None
               ) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate one split of a task.

    Args:
        task: Task name; part of every example id.
        split: Split name (``train``, ``dev``, ...); part of every example id and,
            for ``hub``, the split loaded.
        path: File path; for ``hub`` the dataset name, for ``demo`` the demo task name.
        format: One of ``tsv``, ``csv``, ``jsonl``, ``parquet``, ``hub``, ``demo``.
        text_column: Column holding the text: its name, or (tsv, csv) its 0-based position.
        text_pair_column: Column holding the second text of pair tasks, or None.
        label_column: Column holding the label, or None for unlabeled data.
        kind: ``classification`` or ``regression``.
        labels: The declared label set of a classification task (label id = index),
            or None to infer it as the sorted unique labels of this split.
        header: tsv, csv: whether the first line names the columns. False reads every
            line as an example, and the columns must be positions.
        hub_config: Config name for ``hub`` datasets.

    Returns:
        ``(examples, label_names)``: ``examples`` has the columns ``id``, ``task``,
        ``text``, ``text_pair`` (None for single-text tasks), ``label`` (int64 label id
        for classification, float64 for regression, all NaN when unlabeled) and
        ``source`` (``"original"``); ``label_names`` is the label set (``[]`` for
        regression; the declared set when ``labels`` is given).

    Raises:
        DataError: The data is missing, malformed or does not match the task.
        ConfigError: ``format``, ``kind``, ``labels``, ``header`` or a column is invalid.
    """
    path = os.fspath(path)  # a pathlib.Path works too, and errors show it as text
    if kind not in KINDS:
        raise ConfigError(f"task {task!r}: unknown kind {kind!r}; expected one of {list(KINDS)}")
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(set(labels)) != len(labels) or not labels:
            raise ConfigError(f"task {task!r}: labels must be distinct and non-empty, got {labels}")

    given = {key: column for key, column in (("text_column", text_column), ("text_pair_column", text_pair_column),
                                             ("label_column", label_column)) if column is not None}
    if format not in DELIMITED:
        if not header:
            raise ConfigError(f"task {task!r}: header: false applies to tsv and csv files, not {format}")
        for key, column in given.items():
            if not isinstance(column, str):
                raise ConfigError(f"task {task!r}: {key} is {column!r}; {format} columns are given by name")

    raw = _load(path=path, format=format, split=split, hub_config=hub_config, header=header)
    frame = raw.frame

    def fail(message: str, row: int | None = None, column: str | int | None = None,
             line: int | None = None) -> DataError:
        if row is not None:
            line = int(raw.lines[row])
            if raw.headerless and row == 0 and column is not None and column == columns.get("label_column"):
                # the one mistake header=False invites: a header row read as an example
                message += (f"; line {line} looks like a header row: if the file has one, "
                            f"set tasks.{task}.header: true (the column positions still work)")
        return DataError(message, path=path, line=line, column=column, line_word=raw.line_word)

    columns: dict[str, str | int] = {}
    if len(frame) == 0 and raw.header_line is None:
        raise fail("no examples")
    columns = _resolve_columns(raw, given, task=task, labels=labels, fail=fail)
    if len(frame) == 0:
        raise fail("no examples: the file has a header row only", line=raw.header_line)

    text = _check_text(frame[columns["text_column"]], columns["text_column"], fail)
    pair = (_check_text(frame[columns["text_pair_column"]], columns["text_pair_column"], fail)
            if "text_pair_column" in columns else None)

    label_names: list[str] = []
    if "label_column" not in columns:
        label = pd.Series(np.full(len(frame), np.nan), dtype="float64")
    elif kind == "classification":
        label, label_names = _class_labels(frame[columns["label_column"]], columns["label_column"], labels, fail)
    else:
        label = _regression_targets(frame[columns["label_column"]], columns["label_column"], fail)

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


def _load(*, path: str, format: str, split: str, hub_config: str | None, header: bool) -> _Raw:
    """Load the raw rows of one split, every failure turned into a DataError."""
    if format == "tsv":
        return _read_delimited(path, delimiter="\t", quoting=csv.QUOTE_NONE, header=header)
    if format == "csv":
        return _read_delimited(path, delimiter=",", quoting=csv.QUOTE_MINIMAL, header=header)
    if format == "jsonl":
        return _read_jsonl(path)
    if format == "parquet":
        _check_file(path)
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
            raise DataError(f"cannot read as parquet (not a Parquet file, or a damaged one): {e}",
                            path=path) from e
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


def _names(columns) -> str:
    return ", ".join(repr(c) for c in columns)


def _resolve_columns(raw: _Raw, given: dict[str, str | int], *, task: str, labels: list[str] | None,
                     fail: _Fail) -> dict[str, str | int]:
    """Each column key's column in `raw.frame`: names as given, positions mapped to the header's names."""
    present = list(raw.frame.columns)
    resolved: dict[str, str | int] = {}
    for key, column in given.items():
        if isinstance(column, int) and raw.header_line is not None:
            if column >= len(present):
                raise fail(f"not found: the header row has {len(present)} columns ({_names(present)}), "
                           f"so {key} can be 0 to {len(present) - 1}", line=raw.header_line, column=column)
            resolved[key] = present[column]
        elif column in present:
            resolved[key] = column
        elif raw.headerless:
            raise fail(f"not found: the lines have {len(present)} fields, so {key} can be 0 to {len(present) - 1}",
                       line=int(raw.lines[0]), column=column)
        elif raw.header_line is None:
            noun = "no line has this key (keys" if raw.line_word == "line" else "not found (columns"
            raise fail(f"{noun}: {_names(present)})", column=column)
        else:
            message = f"not found (columns: {_names(present)})"
            if not any(c in present for c in given.values() if isinstance(c, str)):
                label_at = _header_looks_like_data(raw.frame, labels)
                if label_at is not None:
                    message += (f"; the first row looks like data: if the file has no header row, set "
                                f"tasks.{task}.header: false and give columns by position "
                                f"({_positions(list(given), len(present), label_at)})")
            raise fail(message, line=raw.header_line, column=column)
    same = [key for key in resolved if list(resolved.values()).count(resolved[key]) > 1]
    if same:
        raise ConfigError(f"task {task!r}: {' and '.join(same)} are the same column "
                          f"{resolved[same[0]]!r}; each must be a different column")
    return resolved


def _header_looks_like_data(frame: pd.DataFrame, labels: list[str] | None) -> int | bool | None:
    """Whether a header row reads like an example: a cell is a declared label, a number, a value
    found further down its own column, or a sentence of three words or more.

    Returns the position of the cell that looks like a label (True when only a sentence gives the
    row away), or None when the row looks like column names.
    """
    sentence = False
    for position, cell in enumerate(str(c).strip() for c in frame.columns):
        if not cell:
            continue
        if ((labels is not None and cell in labels) or _is_number(cell)
                or frame.iloc[:, position].astype(str).str.strip().eq(cell).any()):
            return position
        sentence = sentence or len(cell.split()) >= 3
    return True if sentence else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _positions(keys: list[str], width: int, label_at: int | bool) -> str:
    """The column keys as positions, e.g. ``text_column: 0, label_column: 1``: the label where a
    label was seen, the texts in the other columns from the left."""
    free = list(range(max(width, len(keys))))
    spots: dict[str, int] = {}
    if "label_column" in keys and label_at is not True:
        spots["label_column"] = free.pop(free.index(label_at))
    elif "label_column" in keys:
        spots["label_column"] = free.pop(min(len(keys), width) - 1)
    for key in keys:
        if key not in spots:
            spots[key] = free.pop(0)
    return ", ".join(f"{key}: {spots[key]}" for key in keys)


def read_text_file(path: str) -> str:
    """A whole UTF-8 text file (a leading byte order mark dropped).

    Raises:
        DataError: The file is missing, is a folder, or is not UTF-8 (naming the line).
    """
    return _decode(_read_bytes(path), path)


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise DataError("is a folder; expected a file", path=path)
    if not os.path.isfile(path):
        raise DataError("file not found", path=path)


def _read_bytes(path: str) -> bytes:
    _check_file(path)
    with open(path, "rb") as f:
        return f.read()


def _decode(data: bytes, path: str,
            column_at: Callable[[bytes, str], str | int | None] | None = None) -> str:
    """UTF-8 bytes as text; a bad byte fails naming its line (and, through `column_at`, its column).

    A BOM left by spreadsheet programs is dropped: it would otherwise end up in the first column's name
    and make it "missing". `column_at(before, prefix)` gets the bytes before the bad byte's line and
    the text on that line before the bad byte.
    """
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        prefix = data[line_start:e.start].decode("utf-8")  # e.start is the first bad byte
        column = column_at(data[:line_start], prefix) if column_at else None
        raise DataError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at character {len(prefix) + 1} of the line "
                        "(save the file as UTF-8)", path=path, line=data.count(b"\n", 0, e.start) + 1,
                        column=column) from None


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


def _read_delimited(path: str, *, delimiter: str, quoting: int, header: bool) -> _Raw:
    """Read a tsv/csv file with the csv module, which tells the line of every row.

    pandas silently pads short rows with NaN; reading it ourselves lets a row with the
    wrong number of fields fail with its line, and keeps line numbers right when a
    quoted csv field spans several lines. Without a header row the first line sets the
    number of fields and the columns are the positions 0, 1, ...
    """
    fmt = "tsv" if delimiter == "\t" else "csv"

    def column_at(before: bytes, prefix: str) -> str | int | None:
        if fmt == "csv" and (b'"' in before or '"' in prefix):
            return None  # quoted fields may hold commas and line breaks; counting would mislead
        position = prefix.count(delimiter)
        if not header:
            return position
        names = next((r for r in csv.reader(io.StringIO(before.decode("utf-8"), newline=""),
                                            delimiter=delimiter, quoting=quoting) if r), None)
        return names[position] if names and position < len(names) else None

    text = _decode(_read_bytes(path), path, column_at)
    rows: list[list[str]] = []
    lines: list[int] = []
    names: list[str] | None = None
    width, header_line, start = None, None, 1
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        for fields in reader:
            if fields:  # blank lines are skipped, but they still count as lines
                if width is None:
                    width, first_line = len(fields), start
                    if header:
                        names, header_line = fields, start
                        if len(set(names)) != len(names):
                            raise DataError(f"duplicate column names in the header: {names}",
                                            path=path, line=start)
                if len(fields) != width:
                    where = "in the header" if header else f"on line {first_line}, the first"
                    why = ("; a tab inside a text splits it (tsv has no quoting)"
                           if fmt == "tsv" and len(fields) > width else "")
                    raise DataError(f"expected {width} fields (as {where}), found {len(fields)}{why}",
                                    path=path, line=start)
                if start != header_line:
                    rows.append(fields)
                    lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(_csv_problem(fmt, str(e)), path=path, line=start) from e
    if width is None:
        raise DataError("empty file" + ("; expected a header row" if header else ""), path=path, line=1)
    columns = names if header else list(range(width))
    frame = pd.DataFrame(rows, columns=columns, dtype=str) if rows else pd.DataFrame(columns=columns)
    return _Raw(frame, np.asarray(lines, dtype=np.int64), "line", header_line=header_line,
                headerless=not header)


def _csv_problem(fmt: str, error: str) -> str:
    """The csv module's complaint, with what usually causes it."""
    if error == "unexpected end of data":
        return "a quoted field that starts on this line is never closed (no closing '\"' before the file ends)"
    if "expected after '\"'" in error:
        return (f"malformed {fmt}: {error}; a '\"' inside a quoted field must be doubled (\"\"), "
                "or the field's opening quote is never closed")
    if "field larger than field limit" in error:
        return f"malformed {fmt}: {error}; most likely a quote opened on this line is never closed"
    return f"malformed {fmt}: {error}"


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's keys, refusing a repeated one (json keeps the last silently)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def _read_jsonl(path: str) -> _Raw:
    """Read one JSON object per line; blank lines are skipped but counted."""
    records: list[dict] = []
    lines: list[int] = []
    for number, line in enumerate(io.StringIO(read_text_file(path)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (character {e.pos + 1})",
                            path=path, line=number) from e
        except _DuplicateKey as e:
            raise DataError("the key appears twice in this object", path=path, line=number,
                            column=str(e.args[0])) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, found {type(record).__name__}",
                            path=path, line=number)
        records.append(record)
        lines.append(number)
    # A key missing from some objects becomes a null there and fails as a missing value.
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    return _Raw(frame, np.asarray(lines, dtype=np.int64), "line")


def _first(mask: np.ndarray) -> tuple[int, str]:
    """Index of the first True in `mask`, and a note on how many more there are."""
    hits = np.flatnonzero(mask)
    more = f" ({len(hits)} rows have this problem)" if len(hits) > 1 else ""
    return int(hits[0]), more


def _check_text(values: pd.Series, column: str | int, fail: _Fail) -> pd.Series:
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
        raise fail(f"expected text, found {_short(bad)} ({type(bad).__name__}){more}", row, column)
    values = values.astype(object)
    blank = (values.str.strip() == "").to_numpy(dtype=bool)
    if blank.any():
        row, more = _first(blank)
        raise fail(f"empty text{more}", row, column)
    return values


def _label_strings(values: pd.Series, column: str | int, fail: _Fail) -> tuple[np.ndarray, np.ndarray]:
    """Labels as the strings a person would write, and which ones are missing.

    Ints and integral floats (parquet/jsonl turn an int column with nulls into floats)
    read as "1", so a file's ``1`` and ``1.0`` both match a declared label ``1``. A list,
    object or bytes value (jsonl, parquet) is no label and fails.
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
        elif isinstance(v, (bool, np.bool_)):
            strings[i] = str(bool(v))
        elif isinstance(v, (int, np.integer, float, np.floating)):
            strings[i] = str(v)
        else:
            raise fail(f"expected a label (text or a number), found {_short(v)} ({type(v).__name__})",
                       i, column)
    return strings, missing


def _short(value: object) -> str:
    """A value as a person would write it (numpy's ``np.int64(1)`` as ``1``), cut to a line's part."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sort_labels(names: set[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else text order."""
    if all(_INT_RE.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _class_labels(values: pd.Series, column: str | int, declared: list[str] | None, fail: _Fail
                  ) -> tuple[pd.Series, list[str]]:
    """Map classification labels to ids in the declared (or inferred) label set."""
    strings, missing = _label_strings(values.reset_index(drop=True), column, fail)
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


def _regression_targets(values: pd.Series, column: str | int, fail: _Fail) -> pd.Series:
    """Parse regression targets as finite floats."""
    values = values.reset_index(drop=True)
    strings, missing = _label_strings(values, column, fail)
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
