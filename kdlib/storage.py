"""The storage root as a `pyarrow.fs` filesystem: a local path or a URI such as `s3://bucket/kdlib`.

Writers on any node reach the same files through it; nothing here assumes a shared local disk. Files
are committed atomically: written under a temporary name, then moved into place (a rename on local
disks; object stores publish an object only once its upload completes).
"""

from __future__ import annotations

import json
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path (relative paths are made absolute) or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_json_atomic(fs: pafs.FileSystem, path: str, obj) -> None:
    write_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(fs: pafs.FileSystem, path: str):
    return json.loads(read_bytes(fs, path))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_names(fs: pafs.FileSystem, folder: str, suffix: str = "") -> list[str]:
    """Base names of the files directly in `folder` ending in `suffix` (none if the folder is absent)."""
    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
