"""The storage root as a `pyarrow.fs` filesystem: a local path or a URI such as `s3://bucket/kdlib`.

Writers on any node reach the same files through it; nothing here assumes a shared local disk. Files
are committed atomically: written under a temporary name, then moved into place (a rename on local
disks; object stores publish an object only once its upload completes).

A location is a string naming a file or folder: a local path, or a URI whose query string (e.g.
`?endpoint_override=...`) applies to every location below it (`child`). Code that needs files on its
own disk (torch, transformers) works on `local_copy(location)`, a read-only mirror on this node (the
location itself when it is local); stage outputs are content-addressed, so a mirror never goes stale.
Folders are produced in `staged_dir(location)`, uploaded when the block ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

LOCAL_CACHE_ENV = "KDLIB_LOCAL_CACHE"  # where a node mirrors remote folders (default: <tmp>/kdlib-cache)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path (relative paths are made absolute) or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def child(location: str, *parts: str) -> str:
    """The location `parts` below `location`; a URI keeps its query string (endpoint, region) at the end."""
    if is_local(location) and not location.startswith("file://"):
        return str(Path(location).expanduser().resolve().joinpath(*parts))
    base, sep, query = location.partition("?")
    return posixpath.join(base, *parts) + sep + query


def name(location: str) -> str:
    """The last component of a location's path (its fingerprint, for stage outputs)."""
    return posixpath.basename(location.partition("?")[0].rstrip("/"))


def parent(location: str) -> str:
    base, sep, query = location.partition("?")
    return posixpath.dirname(base.rstrip("/")) + sep + query


def exists_at(location: str) -> bool:
    return exists(*filesystem(location))


def write_text_at(location: str, text: str) -> None:
    write_atomic(*filesystem(location), text.encode())


def read_text_at(location: str) -> str:
    return read_bytes(*filesystem(location)).decode()


def delete_dir(location: str) -> None:
    """Remove a folder and everything below it, if it exists."""
    fs, path = filesystem(location)
    if exists(fs, path):
        fs.delete_dir(path)


def local_cache_dir() -> Path:
    folder = Path(os.environ.get(LOCAL_CACHE_ENV) or Path(tempfile.gettempdir()) / "kdlib-cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _mirror(location: str) -> Path:
    return local_cache_dir() / hashlib.sha256(location.encode()).hexdigest()[:20]


def local_copy(location: str) -> Path:
    """A folder's files on this node's disk: the folder itself when local, else a mirror downloaded once.

    Only for immutable folders (finished stage outputs): a mirror is never refreshed.
    """
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    mirror = _mirror(location)
    if not mirror.exists():
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{location}: no such folder in the storage root")
        tmp = Path(tempfile.mkdtemp(dir=local_cache_dir(), prefix=".download-"))
        download(fs, path, tmp / "d")
        _publish_mirror(tmp, mirror)
    return mirror / "d"


def _publish_mirror(tmp: Path, mirror: Path) -> None:
    """Move a finished download into place; if another process on this node won the race, keep theirs."""
    try:
        os.rename(tmp, mirror)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def upload(folder: Path, fs: pafs.FileSystem, path: str) -> None:
    """Every file below `folder` to `path` on `fs`, one object each (no directory marker objects: an
    object store has no folders, and concurrent writers creating the same marker can collide)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as src, fs.open_output_stream(join(path, f.relative_to(folder).as_posix())) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)


def download(fs: pafs.FileSystem, path: str, folder: Path) -> None:
    """Every file below `path` on `fs` into `folder` (created), keeping relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            target = folder / posixpath.relpath(info.path, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)


@contextlib.contextmanager
def staged_dir(location: str, *, mirror: bool = False) -> Iterator[Path]:
    """A local folder whose contents end up at `location` when the block ends without an error.

    Local: the location itself (created). Remote: a temporary folder, uploaded at the end, then removed, or
    with `mirror` kept as this node's `local_copy(location)` (for a writer that reads the folder back).
    """
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(dir=local_cache_dir(), prefix=".upload-"))
    (tmp / "d").mkdir()
    try:
        yield tmp / "d"
        upload(tmp / "d", fs, path)
        if mirror:
            _publish_mirror(tmp, _mirror(location))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file: a rename into place on a
    local disk; one upload on an object store (its object appears only once the upload completes)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
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


def list_folders(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Base names of the folders directly in `folder` (none if it is absent)."""
    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def list_names(fs: pafs.FileSystem, folder: str, suffix: str = "") -> list[str]:
    """Base names of the files directly in `folder` ending in `suffix` (none if the folder is absent)."""
    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
