"""The soft-target store: every teacher's logits for every example of a task, in committed Parquet shards.

Layout under the storage root (a local path or a pyarrow.fs URI):

    soft_targets/<task>/<key>/shards/00007.parquet   one shard: examples + teacher_logits (K x C per row)
    soft_targets/<task>/<key>/shards/00007.json      its commit record: rows, split, SHA-256, ids digest
    soft_targets/<task>/<key>/manifest.json          written last: counts, checksums, teachers, settings

`key` is content-addressed (kdlib.pipeline.labels): it hashes the teachers' fingerprint, the task data
digest, the augmentation settings, the unlabeled file's digest, the seed, the encoder's max_length and
the shard size, so different runs with the same inputs share one store. A shard
counts once its Parquet file and then its commit record have been moved into place (each write is
atomic), so an interrupted run resumes by labeling only the shards without a valid commit. Readers
verify every shard's checksum against the manifest.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdlib import storage

STORE_COLUMNS = ["id", "task", "split", "source", "text", "text_pair", "label", "teacher_logits"]
SPLIT_ORDER = ("dev", "train")  # dev shards first: the student's initial member is chosen on dev

SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("split", pa.string()), ("source", pa.string()),
    ("text", pa.string()), ("text_pair", pa.string()), ("label", pa.float64()),
    ("teacher_logits", pa.list_(pa.list_(pa.float32()))),
])


class StoreError(RuntimeError):
    """The store's files disagree with its manifest or commit records (corruption or a foreign write)."""


@dataclass(frozen=True)
class Shard:
    """One unit of labeling work: consecutive examples of one task and split."""

    task: str
    index: int
    split: str
    rows: int
    ids_digest: str


def ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def plan_shards(task: str, examples: pd.DataFrame, shard_size: int) -> list[tuple[Shard, pd.DataFrame]]:
    """Cut a task's examples into shards of at most `shard_size` rows, dev first, never mixing splits.

    The plan depends only on the examples and `shard_size`, so a rerun plans the same shards.
    """
    if not examples["id"].is_unique:
        dup = examples["id"][examples["id"].duplicated()].iloc[0]
        raise ValueError(f"task {task!r}: example id {dup!r} occurs more than once")
    plan, index = [], 0
    for split in SPLIT_ORDER:
        part = examples[examples["split"] == split]
        for start in range(0, len(part), shard_size):
            rows = part.iloc[start:start + shard_size].reset_index(drop=True)
            plan.append((Shard(task, index, split, len(rows), ids_digest(rows["id"])), rows))
            index += 1
    return plan


def to_table(frame: pd.DataFrame) -> pa.Table:
    """Labeled rows -> an Arrow table with the store's schema (teacher_logits: K x C float32 per row)."""
    logits = [[[float(v) for v in member] for member in row] for row in frame["teacher_logits"]]
    cols = {c: frame[c].tolist() for c in STORE_COLUMNS if c not in ("label", "teacher_logits")}
    label = pd.to_numeric(frame["label"], errors="coerce").astype("float64").tolist()
    return pa.table({**cols, "label": label, "teacher_logits": logits}, schema=SCHEMA)


def gold_only_dataset(task: str, examples: pd.DataFrame):
    """A task without teachers (tasks.<t>.teacher: false): its examples in the store's row schema with no
    teacher logits, as a Ray Dataset; they train on their gold labels only (MT-DNN KD trains some tasks so)."""
    import ray.data

    frame = examples.assign(task=task, teacher_logits=[[] for _ in range(len(examples))])
    return ray.data.from_arrow([to_table(frame)])


class SoftTargetStore:
    """One task's soft targets for one content key."""

    def __init__(self, root: str, task: str, key: str):
        self.root, self.task, self.key = root, task, key
        self.location = storage.child(root, "soft_targets", task, key)  # a local path or a URI
        self.fs, self.base = storage.filesystem(self.location)
        self.shards_dir = storage.join(self.base, "shards")
        self.manifest_path = storage.join(self.base, "manifest.json")

    def __repr__(self) -> str:
        return f"SoftTargetStore({self.base!r})"

    def shard_path(self, index: int) -> str:
        return storage.join(self.shards_dir, f"{index:05d}.parquet")

    def _commit_path(self, index: int) -> str:
        return storage.join(self.shards_dir, f"{index:05d}.json")

    # -- writing -------------------------------------------------------------------------------------
    def commit(self, shard: Shard, frame: pd.DataFrame, seconds: float | None = None, node: str | None = None) -> dict:
        """Write a labeled shard, then its commit record; both atomically. Idempotent for equal content.

        seconds: how long labeling the shard took, node: where (both recorded with the commit time, for
        throughput and placement reports).
        """
        if len(frame) != shard.rows or ids_digest(frame["id"]) != shard.ids_digest:
            raise StoreError(f"{self}: shard {shard.index} holds {len(frame)} rows whose ids do not match its "
                             f"plan ({shard.rows} rows)")
        buf = io.BytesIO()
        pq.write_table(to_table(frame), buf)
        data = buf.getvalue()
        storage.write_atomic(self.fs, self.shard_path(shard.index), data)
        record = {**asdict(shard), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                  "seconds": seconds, "node": node, "committed_at": time.time()}
        storage.write_json_atomic(self.fs, self._commit_path(shard.index), record)
        return record

    def commit_record(self, shard: Shard, *, verify: bool = True) -> dict | None:
        """The shard's commit record if it is committed for exactly this plan (and its file matches)."""
        path = self._commit_path(shard.index)
        if not storage.exists(self.fs, path):
            return None
        record = storage.read_json(self.fs, path)
        if {k: record.get(k) for k in asdict(shard)} != asdict(shard):
            return None  # committed for another plan: relabel
        if verify and hashlib.sha256(self._read_shard_bytes(shard.index)).hexdigest() != record["sha256"]:
            return None
        return record

    def commit_records(self) -> list[dict]:
        """Every commit record present (valid or not), for progress and throughput reports."""
        return [storage.read_json(self.fs, storage.join(self.shards_dir, n))
                for n in storage.list_names(self.fs, self.shards_dir, ".json")]

    def committed_rows(self) -> int:
        """Rows in committed shards (cheap: reads commit records only). For progress reports."""
        return sum(storage.read_json(self.fs, storage.join(self.shards_dir, n))["rows"]
                   for n in storage.list_names(self.fs, self.shards_dir, ".json"))

    def finalize(self, plan: list[Shard], info: dict) -> dict:
        """Check that every planned shard is committed and intact, then write the manifest."""
        records = []
        for shard in plan:
            record = self.commit_record(shard)
            if record is None:
                raise StoreError(f"{self}: shard {shard.index} ({shard.split}) is not committed")
            records.append(record)
        counts = {s: sum(r["rows"] for r in records if r["split"] == s) for s in SPLIT_ORDER}
        manifest = {"task": self.task, "key": self.key, "rows": sum(counts.values()), "rows_by_split": counts,
                    "shards": records, **info}
        storage.write_json_atomic(self.fs, self.manifest_path, manifest)
        return manifest

    # -- reading -------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return storage.exists(self.fs, self.manifest_path)

    def manifest(self) -> dict:
        if not self.is_complete():
            raise StoreError(f"{self}: no manifest.json; labeling has not finished")
        return storage.read_json(self.fs, self.manifest_path)

    def _read_shard_bytes(self, index: int) -> bytes:
        return storage.read_bytes(self.fs, self.shard_path(index))

    def read_shard(self, shard: Shard, sha256: str) -> pd.DataFrame:
        return pq.read_table(io.BytesIO(self._verified_bytes(shard.index, sha256))).to_pandas()

    def read(self, split: str | None = None) -> pd.DataFrame:
        """All rows (or one split's), every shard verified against the manifest's checksum and count."""
        frames = []
        for r in self.manifest()["shards"]:
            if split is not None and r["split"] != split:
                continue
            frame = self.read_shard(Shard(**{k: r[k] for k in ("task", "index", "split", "rows", "ids_digest")}),
                                    r["sha256"])
            if len(frame) != r["rows"]:
                raise StoreError(f"{self}: shard {r['index']} has {len(frame)} rows, the manifest says {r['rows']}")
            frames.append(frame)
        if not frames:
            return to_table(pd.DataFrame(columns=STORE_COLUMNS)).to_pandas()
        return pd.concat(frames, ignore_index=True)

    def read_committed(self, shards: list[Shard]) -> pd.DataFrame:
        """Rows of planned shards before the manifest exists (each checked against its commit record)."""
        frames = []
        for shard in shards:
            record = self.commit_record(shard, verify=False)
            if record is None:
                raise StoreError(f"{self}: shard {shard.index} ({shard.split}) is not committed")
            frames.append(self.read_shard(shard, record["sha256"]))
        return pd.concat(frames, ignore_index=True)

    def shard_paths(self, split: str | None = None) -> list[str]:
        """Paths (in this store's filesystem) of the manifest's shards, or of one split's."""
        return [self.shard_path(r["index"]) for r in self.manifest()["shards"]
                if split is None or r["split"] == split]

    def verify(self) -> None:
        """Check every shard's checksum against the manifest (raises StoreError)."""
        for r in self.manifest()["shards"]:
            self._verified_bytes(r["index"], r["sha256"])

    def dataset(self, split: str | None = None):
        """The store's rows (or one split's) as a Ray Dataset, one block per shard, each verified against
        the manifest's checksum as it is read (through pyarrow.fs: any node reaches the store).

        The shards are read here and handed to Ray's object store. Not `ray.data.read_parquet` or
        `from_arrow_refs`: both start tasks that ask for a whole CPU, which a cluster whose CPUs the train
        workers hold (0.9 each on 2 cores) never frees, so the read would hang.
        """
        import ray.data

        tables = [pq.read_table(io.BytesIO(self._verified_bytes(r["index"], r["sha256"])))
                  for r in self.manifest()["shards"] if split is None or r["split"] == split]
        return ray.data.from_arrow(tables)

    def _verified_bytes(self, index: int, sha256: str) -> bytes:
        data = self._read_shard_bytes(index)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"{self}: shard {index} does not match the manifest's checksum")
        return data


def carry_over(store: SoftTargetStore, plan: list[tuple[Shard, pd.DataFrame]], *, teachers: str,
               max_length: int) -> dict:
    """Commit the planned shards of `store` whose every example another complete version of the task's
    store has labeled with the same teachers: their logits are copied there, not computed again.

    A version's key hashes its whole input set, so adding an unlabeled file or more masked copies makes a
    new version; the examples the old one holds need no teacher again. Another version qualifies when its
    manifest names the same teachers (fingerprint) and max_length; an example matches when its id, text
    and text pair are equal (a masked copy's id alone does not fix its text). A shard with any unmatched
    example is left to label.

    Returns {"shards": carried, "rows": carried rows, "from": [keys of the versions used]}.
    """
    carried = {"shards": 0, "rows": 0, "from": []}
    # Unverified here (no shard read): a corrupt commit is not carried over, and labeling's own check relabels it.
    todo = [(s, ex) for s, ex in plan if s.task == store.task and store.commit_record(s, verify=False) is None]
    if not todo:
        return carried
    task_dir = storage.parent(store.base)
    known: dict[tuple, tuple[list, str]] = {}
    for key in storage.list_folders(store.fs, task_dir):
        other = SoftTargetStore(store.root, store.task, key)
        if key == store.key or not other.is_complete():
            continue
        m = other.manifest()
        if (m.get("teachers") or {}).get("fingerprint") != teachers or m.get("max_length") != max_length:
            continue
        rows = other.read()
        for ex_id, text, pair, logits in zip(rows["id"], rows["text"], rows["text_pair"], rows["teacher_logits"]):
            known.setdefault(_example_key(ex_id, text, pair), (logits, key))
    used = set()
    for shard, ex in todo:
        hits = [known.get(_example_key(i, a, b)) for i, a, b in zip(ex["id"], ex["text"], ex["text_pair"])]
        if not hits or any(h is None for h in hits):
            continue
        store.commit(shard, ex.assign(teacher_logits=[h[0] for h in hits]), seconds=0.0, node="carried-over")
        used |= {h[1] for h in hits}
        carried["shards"] += 1
        carried["rows"] += shard.rows
    carried["from"] = sorted(used)
    return carried


def _example_key(ex_id, text, pair) -> tuple:
    return str(ex_id), str(text), pair if isinstance(pair, str) else None


def teacher_logits_array(df: pd.DataFrame) -> np.ndarray:
    """The nested `teacher_logits` column as a float32 array of shape (N, K, C); (N, 0, 1) for rows of a
    task without teachers."""
    if df.empty:
        return np.zeros((0, 1, 1), dtype=np.float32)
    if all(len(row) == 0 for row in df["teacher_logits"]):
        return np.zeros((len(df), 0, 1), dtype=np.float32)
    return np.stack([np.stack([np.asarray(m, dtype=np.float32) for m in row]) for row in df["teacher_logits"]])
