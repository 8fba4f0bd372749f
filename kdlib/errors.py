"""User-facing errors: each names what is wrong and where (file, line, column or key)."""

from __future__ import annotations

import functools


class KdlibError(Exception):
    """Base of kdlib's user-facing errors."""


class ConfigError(KdlibError):
    """A config file or command-line override that does not validate."""


class DataError(KdlibError):
    """Bad task data. The message names the file, the line (1-based; header = line 1) and the column.

    Example: ``data/sst2/train.tsv, line 17, column 'sentence': empty text``.

    Args:
        message: What is wrong, without the location.
        path: The file (or dataset name) the data came from.
        line: 1-based line as seen in an editor; for formats without lines
            (parquet, hub, demo) the 1-based row, with ``line_word="row"``.
        column: The column holding the bad value: its name, or its 0-based position in a file
            without a header row (``column 2``).
        line_word: How the location reads: ``"line"`` or ``"row"``.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 column: str | int | None = None, line_word: str = "line"):
        self.path, self.line, self.column, self.reason = path, line, column, message
        self.line_word = line_word
        where = [str(path)] if path else []
        if line is not None:
            where.append(f"{line_word} {line}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(", ".join(where) + ": " + message if where else message)

    def __reduce__(self):
        # Ray ships errors between processes by pickling them; the default
        # reduction would call DataError(full_text) and lose the location fields.
        rebuild = functools.partial(type(self), path=self.path, line=self.line,
                                    column=self.column, line_word=self.line_word)
        return rebuild, (self.reason,)


class DeviceOutOfMemory(KdlibError):
    """A batch did not fit the device's memory; the message names the batch-size setting to lower."""


class ResourceError(KdlibError):
    """The config asks Ray for resources (GPUs) that the cluster does not have."""
