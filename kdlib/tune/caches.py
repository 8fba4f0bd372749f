"""What trials share: frozen trunk states per (task, depth), teachers per (task, L, seed), finished students.

Concurrent trials on one machine (or on nodes sharing a storage with working `flock`, e.g. NFSv4) meet
at a lock file per cache entry:
the first computes and writes atomically (temp file, then rename), later ones wait and read. An entry
counts only once its `_DONE.json` marker exists, so a trial killed mid-write leaves nothing half-read.

Layout under <storage_root>/cache/:
    trunk_states/<task>/<fp>/{train,dev}.safetensors   flat (sum T_i, H) states + (N,) lengths
    teachers/<fp>/ensemble                               kdlib.teachers artifact (same key as jobs/distill.py)
    tune_teacher_outputs/<fp>/                           teacher logits on train/dev, member scores, best member
    tune_students/<fp>/student                           a trial's single-task student + per-epoch scores
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdlib.features import TrunkFeatures
from kdlib.stages import DONE

LOG = "computed.jsonl"  # one line per computation of an entry: how tests and the benchmark count work


@contextlib.contextmanager
def locked(folder: Path):
    """Exclusive lock on `folder` (created) for the block: other processes wait at the same call."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_done(folder: Path) -> bool:
    return (folder / DONE).exists()


def mark_done(folder: Path, info: dict) -> None:
    tmp = folder / f".{DONE}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / DONE)
    with open(folder.parent / LOG, "a") as fh:  # append-only, under the entry's lock
        fh.write(json.dumps({"entry": folder.name, "time": time.time(), **info}) + "\n")


def clear_unfinished(folder: Path) -> None:
    """A folder without its marker is what a killed writer left: start it over."""
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def save_states(feats: TrunkFeatures, path: Path) -> None:
    lengths = torch.tensor(feats.lengths, dtype=torch.int64)
    flat = torch.cat(feats.states) if len(feats) else torch.zeros(0, 0)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"states": flat.contiguous(), "lengths": lengths}, str(tmp))
    os.replace(tmp, path)


def load_states(path: Path) -> TrunkFeatures:
    data = load_file(str(path))
    return TrunkFeatures(list(torch.split(data["states"], data["lengths"].tolist())))  # N x (T_i, H)


def trunk_states(folder: Path, compute, splits=("train", "dev")) -> tuple[dict[str, TrunkFeatures], bool]:
    """The cached trunk states of each split, computing them once (`compute(split) -> TrunkFeatures`).

    Returns:
        ({split: features}, whether this call computed them).
    """
    if is_done(folder):
        return {s: load_states(folder / f"{s}.safetensors") for s in splits}, False
    with locked(folder):
        if is_done(folder):  # another trial computed them while we waited
            return {s: load_states(folder / f"{s}.safetensors") for s in splits}, False
        clear_unfinished(folder)
        start, feats = time.perf_counter(), {}
        for s in splits:
            feats[s] = compute(s)
            save_states(feats[s], folder / f"{s}.safetensors")
        mark_done(folder, {"kind": "trunk_states", "seconds": round(time.perf_counter() - start, 2),
                           "rows": {s: len(f) for s, f in feats.items()}})
        return feats, True


def once(folder: Path, build, kind: str) -> tuple[Path, bool]:
    """Run `build(folder)` unless `folder` is done (another process may be building it: wait for it).

    Returns:
        (folder, whether this call built it).
    """
    if is_done(folder):
        return folder, False
    with locked(folder):
        if is_done(folder):
            return folder, False
        clear_unfinished(folder)
        start = time.perf_counter()
        info = build(folder) or {}
        mark_done(folder, {"kind": kind, "seconds": round(time.perf_counter() - start, 2), **info})
        return folder, True


def computed_entries(root: Path, kind: str) -> list[dict]:
    """Every logged computation of `kind` under the cache root (for tests and the benchmark)."""
    rows = []
    for log in (Path(root) / "cache").rglob(LOG):
        rows += [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == kind]
    return rows
