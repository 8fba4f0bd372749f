"""What trials share: frozen trunk states per (task, depth), teachers per (task, L, seed), finished students.

Each cache entry is a location under the storage root (a local path or a pyarrow.fs URI, see
kdlib.storage). Concurrent trials meet at the entry's lock: the first computes and writes, later ones
wait and read. The lock is a file lock (`flock`) on a local root (one machine, or nodes sharing a file
system with working `flock`, e.g. NFSv4), and a lease held by a named Ray actor on a remote root, so
trials on any node of the cluster compute each entry once. A lease lapses unless its holder renews
it, so a trial that died holding one delays the others by at most `LEASE_SECONDS`. An entry counts
only once its `_DONE.json` marker exists (written after its files), so a trial killed mid-write leaves
nothing half-read; the next one clears it and starts over. Readers get an entry's files on their own
disk (`storage.local_copy`).

Layout under <storage_root>/cache/:
    trunk_states/<task>/<fp>/{train,dev}.safetensors   flat (sum T_i, H) states + (N,) lengths
    teachers/<fp>/ensemble                               kdlib.teachers artifact (same key as kdlib.pipeline.teachers)
    tune_teacher_outputs/<fp>/                           teacher logits on train/dev, member scores, best member
    tune_students/<fp>/student                           a trial's single-task student + per-epoch scores
    <kind folder>/_computed/<entry>-<id>.json            one record per computation (tests and benchmarks count them)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
from safetensors.torch import load_file, save_file

from kdlib import storage
from kdlib.features import TrunkFeatures
from kdlib.stages import DONE

COMPUTED = "_computed"
LEASE_SECONDS = 60.0
LEASES_ACTOR = "kdlib-cache-leases"


@contextlib.contextmanager
def locked(location: str):
    """Exclusive hold on a cache entry for the block: other trials (any node) wait at the same call."""
    if storage.is_local(location):
        folder = Path(storage.filesystem(location)[1])
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{folder.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    with _lease(location.partition("?")[0]):
        yield


@ray.remote(num_cpus=0)
class _Leases:
    """Who holds which entry, until when. Named and detached: the first trial that asks creates it, and it
    outlives any one trial or job."""

    def __init__(self):
        self.held: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, owner: str, seconds: float) -> bool:
        """Take (or, for the holder, extend) the lease on `key`; False while someone else holds it."""
        holder = self.held.get(key)
        if holder is None or holder[0] == owner or holder[1] < time.time():
            self.held[key] = (owner, time.time() + seconds)
            return True
        return False

    def release(self, key: str, owner: str) -> None:
        if self.held.get(key, ("",))[0] == owner:
            del self.held[key]


@contextlib.contextmanager
def _lease(key: str):
    leases = _Leases.options(name=LEASES_ACTOR, namespace="kdlib", lifetime="detached", get_if_exists=True).remote()
    owner, stop = uuid.uuid4().hex, threading.Event()
    while not ray.get(leases.acquire.remote(key, owner, LEASE_SECONDS)):
        time.sleep(0.5)

    def renew():  # re-acquiring as the holder extends the lease
        while not stop.wait(LEASE_SECONDS / 4):
            ray.get(leases.acquire.remote(key, owner, LEASE_SECONDS))

    keeper = threading.Thread(target=renew, daemon=True, name="kdlib-lease")
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        ray.get(leases.release.remote(key, owner))


def is_done(location: str) -> bool:
    return storage.exists_at(storage.child(location, DONE))


def done_info(location: str) -> dict:
    return json.loads(storage.read_text_at(storage.child(location, DONE)))


def mark_done(location: str, info: dict) -> None:
    """Make the entry count (its files are in place), and record the computation beside it."""
    storage.write_text_at(storage.child(location, DONE), json.dumps(info))
    record = {"entry": storage.name(location), "time": time.time(), **info}
    storage.write_text_at(storage.child(storage.parent(location), COMPUTED,
                                        f"{storage.name(location)}-{uuid.uuid4().hex[:8]}.json"), json.dumps(record))


def clear_unfinished(location: str) -> None:
    """An entry without its marker is what a killed writer left: start it over."""
    storage.delete_dir(location)


def publish(folder: Path, location: str, sub: str) -> None:
    """Upload `folder/sub` to the entry now (a no-op on a local root, where the files are already there)."""
    fs, path = storage.filesystem(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        storage.upload(folder / sub, fs, storage.join(path, sub))


def save_states(feats: TrunkFeatures, path: Path) -> None:
    lengths = torch.tensor(feats.lengths, dtype=torch.int64)
    flat = torch.cat(feats.states) if len(feats) else torch.zeros(0, 0)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"states": flat.contiguous(), "lengths": lengths}, str(tmp))
    tmp.replace(path)


def load_states(path: Path) -> TrunkFeatures:
    data = load_file(str(path))
    return TrunkFeatures(list(torch.split(data["states"], data["lengths"].tolist())))  # N x (T_i, H)


def once(location: str, build, kind: str) -> tuple[Path, bool]:
    """Run `build(folder)` unless the entry is done (another trial may be building it: wait for it).

    Returns:
        (the entry's folder on this node, whether this call built it).
    """
    if is_done(location):
        return storage.local_copy(location), False
    with locked(location):
        if is_done(location):
            return storage.local_copy(location), False
        clear_unfinished(location)
        start = time.perf_counter()
        with storage.staged_dir(location, mirror=True) as out:  # read back below without a download
            info = build(out) or {}
        mark_done(location, {"kind": kind, "seconds": round(time.perf_counter() - start, 2), **info})
        return storage.local_copy(location), True


def trunk_states(location: str, compute, splits=("train", "dev")) -> tuple[dict[str, TrunkFeatures], bool]:
    """The cached trunk states of each split, computing them once (`compute(split) -> TrunkFeatures`).

    Returns:
        ({split: features}, whether this call computed them).
    """
    feats: dict[str, TrunkFeatures] = {}

    def build(out: Path) -> dict:
        for s in splits:
            feats[s] = compute(s)
            save_states(feats[s], out / f"{s}.safetensors")
        return {"rows": {s: len(f) for s, f in feats.items()}}

    folder, built = once(location, build, "trunk_states")
    return (feats if built else {s: load_states(folder / f"{s}.safetensors") for s in splits}), built


def computed_entries(root, kind: str) -> list[dict]:
    """Every recorded computation of `kind` under the storage root's cache (for tests and the benchmark)."""
    fs, base = storage.filesystem(storage.child(str(root), "cache"))
    if not storage.exists(fs, base):
        return []
    rows = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File and info.path.split("/")[-2:-1] == [COMPUTED]:
            record = json.loads(storage.read_bytes(fs, info.path))
            if record.get("kind") == kind:
                rows.append(record)
    return sorted(rows, key=lambda r: r["time"])

