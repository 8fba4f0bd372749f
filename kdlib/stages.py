"""Content-addressed stage outputs: a stage whose inputs did not change is not recomputed.

Each stage writes into `<storage_root>/cache/<stage>/<fingerprint>/` (a local path or a pyarrow.fs URI), where the fingerprint hashes
everything the output depends on (settings, upstream fingerprints, data digests). A `_DONE.json`
marker, written last, makes a folder count; an interrupted stage leaves no marker and reruns, keeping only
what it can resume from (`RESUMABLE`: Ray Train's checkpoints).

The stages' console lines come from here, so they read alike: `[stage] running -> <output>`,
`[stage] done in 12.3s on <where>`, `[stage] inputs unchanged, reusing <output>`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from kdlib import storage

DONE = "_DONE.json"
RESUMABLE = "ray_train"  # what an unfinished attempt leaves for the next: Ray Train resumes from its checkpoints


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (dicts are hashed with sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    path: str
    cached: bool
    seconds: float
    where: str = ""  # the nodes (and workers) that ran it, e.g. "192.0.2.7 (2 train workers)"


@dataclass
class StageCache:
    """Stage outputs under `<root>/cache/`; `root` is a storage location (a local path or a URI).

    A stage's output is a location string (see kdlib.storage); readers on any node use
    `storage.local_copy(location)` to get its files on their own disk.
    """

    root: str
    records: list[StageRecord] = field(default_factory=list)
    log: Callable[[str], None] = field(default=print, repr=False)  # where the stage lines go

    def __post_init__(self):
        self.root = str(self.root)

    def location(self, stage: str, fp: str) -> str:
        return storage.child(self.root, "cache", stage, fp)

    def is_done(self, stage: str, fp: str) -> bool:
        return storage.exists_at(storage.child(self.location(stage, fp), DONE))

    def begin(self, stage: str, fp: str) -> tuple[str, bool]:
        """(output location, already done). An output without its marker is cleared for a fresh start, but
        for what the new attempt resumes from (`RESUMABLE`)."""
        out = self.location(stage, fp)
        if self.is_done(stage, fp):
            return out, True
        _clear_except(out, RESUMABLE)  # a previous attempt died (or was stopped) before writing its marker
        return out, False

    def start(self, stage: str, out: str, label: str = "") -> None:
        self.log(f"[{label or stage}] running -> {out}")

    def finish(self, stage: str, fp: str, seconds: float, info: dict | None = None, label: str = "") -> None:
        """Write the marker that makes the stage's output count, and record it for the run summary."""
        out = self.location(stage, fp)
        info = info or {}
        storage.write_text_at(storage.child(out, DONE), json.dumps({"stage": stage, "fingerprint": fp,
                                                                     "seconds": round(seconds, 2), **info}))
        self.records.append(StageRecord(stage, fp, out, False, round(seconds, 2), info.get("where", "")))
        self.log(done_line(label or stage, seconds, info.get("where", "")))

    def record(self, stage: str, fp: str, path: str, *, cached: bool, seconds: float, where: str = "") -> None:
        """Record a stage whose output lives elsewhere (the soft-target store) in the run summary."""
        self.records.append(StageRecord(stage, fp, str(path), cached, round(seconds, 2), where))

    def reuse(self, stage: str, fp: str, label: str = "") -> None:
        out = self.location(stage, fp)
        done = json.loads(storage.read_text_at(storage.child(out, DONE)))
        self.records.append(StageRecord(stage, fp, out, True, 0.0,
                                        f"reused (ran on {done['where']})" if done.get("where") else "reused"))
        self.log(reuse_line(label or stage, out))

    def table(self) -> str:
        """The run's stages as a Markdown table: what ran, where, how long, and what was reused."""
        lines = ["| stage | output | where | seconds |", "|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.name} | {storage.name(storage.parent(r.path))}/{storage.name(r.path)} | "
                         f"{r.where or '-'} | {'cached' if r.cached else f'{r.seconds:.1f}'} |")
        return "\n".join(lines)

    def run(self, stage: str, fp: str, fn) -> str:
        """Run `fn(out_dir)` unless this stage's output for `fp` exists; returns the output location.

        `out_dir` is a local folder: the output location itself on a local root, else a folder uploaded
        to it once `fn` returns. `fn` may return a dict of facts for the marker (e.g. {"where": ...})."""
        out, done = self.begin(stage, fp)
        if done:
            self.reuse(stage, fp)
            return out
        self.start(stage, out)
        start = time.perf_counter()
        with storage.staged_dir(out) as folder:
            info = fn(folder)
        self.finish(stage, fp, time.perf_counter() - start, info if isinstance(info, dict) else None)
        return out


def done_line(label: str, seconds: float, where: str = "", detail: str = "") -> str:
    """A stage's last line: '[distill] done in 37.7s on 192.0.2.7 (2 train workers)'."""
    return f"[{label}] done in {seconds:.1f}s{f' on {where}' if where else ''}{f': {detail}' if detail else ''}"


def reuse_line(label: str, out: str) -> str:
    return f"[{label}] inputs unchanged, reusing {out}"


def _clear_except(location: str, keep: str) -> None:
    """Delete a folder's contents but its entry `keep`."""
    fs, path = storage.filesystem(location)
    if not storage.exists(fs, path):
        return
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if storage.name(info.path) == keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
