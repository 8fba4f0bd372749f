"""Teacher labeling: a Ray Data actor pool hosts the teacher ensembles and fills the soft-target store.

Each actor loads the encoder once and every task's ensemble on it (`ShardLabeler.__init__`), and the user's
own teacher checkpoints, each with its own tokenizer (kdlib.teacher_checkpoints). One
input row is one planned shard; the actor runs the shared frozen trunk once per mini-batch and every
member's own top layers on it, commits the shard to the store (soft_targets.py), and emits either the
labeled rows (streaming them into training) or a one-row summary. A shard that is already committed is
read back instead of relabeled, so a retried task (Ray Data restarts dead actors and retries their
tasks), a rerun after an interruption and a re-executed stream all see each example exactly once.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import ray
import torch

from kdlib import storage
from kdlib.artifact import load_model
from kdlib.device import autocast, device, is_out_of_memory
from kdlib.encoder import load_encoder, load_tokenizer
from kdlib.errors import DeviceOutOfMemory
from kdlib.soft_targets import STORE_COLUMNS, Shard, SoftTargetStore
from kdlib.teacher_checkpoints import CheckpointMember, CheckpointTeacher, SharedBottom, shared_bottom_groups
from kdlib.tokenize import length_sorted_batches

SHARD_FIELDS = list(Shard.__dataclass_fields__)
EXAMPLE_LISTS = {"ids": "id", "texts": "text", "pairs": "text_pair", "labels": "label", "sources": "source"}


class ShardLabeler:
    """Stateful Ray Data UDF: all tasks' teacher ensembles on one shared encoder."""

    def __init__(self, *, ensembles: dict[str, str], stores: dict[str, tuple[str, str]], encoder_source: str,
                 random_init: bool, config_overrides: dict, seed: int, max_length: int, torch_threads: int,
                 batch_size: int, emit_rows: bool, batch_tokens: int | None = None, precision: str = "fp32",
                 checkpoints: dict[str, list[CheckpointMember]] | None = None, inject_oom_rows: int | None = None):
        torch.set_num_threads(torch_threads)
        self.device = device()  # the GPU (share) this actor asked Ray for, else the CPU
        self.models, self.members = {}, {}
        if ensembles:  # kdlib's own ensembles: all on one shared encoder (loaded only when some task has one)
            encoder = load_encoder(encoder_source, random_init, config_overrides, seed=seed).to(self.device)
            for task, folder in ensembles.items():  # every ensemble wraps the same encoder modules
                model, manifest = load_model(storage.local_copy(folder), encoder=encoder)
                self.models[task] = model.to(self.device)
                self.members[task] = [b["name"] for b in manifest["branches"]]
            self.tokenizer = load_tokenizer(encoder_source)
        # the user's own teachers: each member with its own tokenizer and length limit
        self.groups = {task: shared_bottom_groups([CheckpointTeacher(m, self.device) for m in members])
                       for task, members in (checkpoints or {}).items()}
        self.stores = {task: SoftTargetStore(root, task, key) for task, (root, key) in stores.items()}
        self.max_length, self.batch_size, self.emit_rows = max_length, batch_size, emit_rows
        self.batch_tokens, self.precision = batch_tokens, precision
        self.inject_oom_rows = inject_oom_rows  # tests: batches of more rows raise torch.OutOfMemoryError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for _, row in batch.iterrows():
            shard = Shard(**{f: (int(row[f]) if f in ("index", "rows") else row[f]) for f in SHARD_FIELDS})
            store = self.stores[shard.task]
            record = store.commit_record(shard)
            if record is not None:  # committed by an earlier attempt: read, do not relabel
                frame = store.read_shard(shard, record["sha256"]) if self.emit_rows else None
            else:
                examples = pd.DataFrame({col: list(row[key]) for key, col in EXAMPLE_LISTS.items()})
                examples.insert(1, "task", shard.task)
                examples.insert(2, "split", shard.split)
                start = time.perf_counter()
                frame = self.label(shard.task, examples)
                store.commit(shard, frame, seconds=round(time.perf_counter() - start, 3),
                             node=ray.util.get_node_ip_address())
            if self.emit_rows:
                out.append(frame[STORE_COLUMNS])
            else:
                out.append(pd.DataFrame([{**asdict(shard), "relabeled": record is None}]))
        return pd.concat(out, ignore_index=True)

    @torch.inference_mode()
    def label(self, task: str, examples: pd.DataFrame) -> pd.DataFrame:
        """Every member's logits for every example; mini-batches of similar length, original order kept."""
        texts, pairs = examples["text"].tolist(), examples["text_pair"].tolist()
        if task in self.groups:  # (N, K, C): each member on its own tokens; identical bottoms run once
            columns = [None] * sum(len(positions) for positions, _ in self.groups[task])
            for positions, runner in self.groups[task]:
                out = self.run(runner.tokenizer, runner.member.max_length, runner.forward, texts, pairs)
                for j, k in enumerate(positions):
                    columns[k] = out[:, j] if isinstance(runner, SharedBottom) else out
            logits = np.stack(columns, axis=1)
        else:  # kdlib's ensemble: the shared trunk once per batch, then every member's branch
            model, names = self.models[task], self.members[task]

            def forward(enc: dict[str, torch.Tensor]) -> torch.Tensor:  # (B, K, C)
                out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], names=names)
                return torch.stack([out[n].float() for n in names], dim=1)

            logits = self.run(self.tokenizer, self.max_length, forward, texts, pairs)
        frame = examples.copy()
        frame["teacher_logits"] = [x.tolist() for x in logits]
        return frame

    def run(self, tokenizer, max_length: int, forward, texts: list[str], pairs: list) -> np.ndarray:
        """`forward` over every example, on the device under the run's precision, in the examples' order.

        The batches are prepared in the background while the model runs; a batch that runs out of device
        memory is split and retried (every example labeled once)."""
        def guarded(enc: dict[str, torch.Tensor]) -> torch.Tensor:
            if self.inject_oom_rows is not None and len(enc["input_ids"]) > self.inject_oom_rows:
                raise torch.OutOfMemoryError(f"injected: more than {self.inject_oom_rows} rows")
            with autocast(self.device, self.precision):
                return forward(enc).float()

        out = [None] * len(texts)
        batches = input_batches(tokenizer, texts, pairs, max_length=max_length, batch_size=self.batch_size,
                                batch_tokens=self.batch_tokens, pin=self.device.type == "cuda")
        for idx, enc in in_background(batches):  # the next batches tokenize while this one runs
            enc = {k: v.to(self.device, non_blocking=True) for k, v in enc.items()}
            block = split_on_out_of_memory(guarded, enc).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = block[j]
        return np.stack(out)


def input_batches(tokenizer, texts: list[str], pairs: list, *, max_length: int, batch_size: int,
                  batch_tokens: int | None, pin: bool, chunk_batches: int = 8):
    """(row indices, input tensors) for every batch of a shard, tokenized a chunk of `chunk_batches` batches
    at a time (length-sorted within the chunk), so that labeling can start on the first chunk while the next
    ones tokenize. pin: page-locked tensors, whose copies to a GPU overlap its work."""
    chunk = batch_size * chunk_batches
    for start in range(0, len(texts), chunk):
        for idx, enc in length_sorted_batches(tokenizer, texts[start:start + chunk], pairs[start:start + chunk],
                                              max_length=max_length, batch_size=batch_size, batch_tokens=batch_tokens):
            tensors = {k: torch.from_numpy(v) for k, v in enc.items()}
            yield idx + start, {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors


def in_background(items, depth: int = 4):
    """Iterate `items` in a background thread, up to `depth` ahead of the consumer, in order.

    The fast tokenizer and tensor copies release the GIL, so the next batches are prepared while the model
    runs the current one (on a GPU, while its kernels run). An error in the producer is raised here; a
    consumer that stops early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failed(e))

    thread = threading.Thread(target=produce, daemon=True, name="labeling-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


@dataclass
class _Failed:
    error: BaseException


def split_on_out_of_memory(forward, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """`forward(enc)`, or, when the device runs out of memory, the same rows in two halves (recursively), joined
    in order: every row is labeled once, however often its batch had to be split.

    A single row that does not fit raises DeviceOutOfMemory naming what to lower."""
    try:
        return forward(enc)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        rows, tokens = enc["input_ids"].shape
        if rows == 1:
            raise DeviceOutOfMemory(f"one example of {tokens} tokens does not fit the device's memory: lower "
                                    "encoder.max_length, or give each labeling actor more of a GPU "
                                    "(labeling.gpus_per_actor)") from e
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = rows // 2
        return torch.cat([split_on_out_of_memory(forward, {k: v[:half] for k, v in enc.items()}),
                          split_on_out_of_memory(forward, {k: v[half:] for k, v in enc.items()})])


def shard_rows(plan: list[tuple[Shard, pd.DataFrame]]) -> pd.DataFrame:
    """One row per shard: its identity and its examples as list columns (the labeling dataset's input)."""
    rows = []
    for shard, examples in plan:
        row = asdict(shard)
        for key, col in EXAMPLE_LISTS.items():
            values = examples[col].tolist()
            row[key] = [float(v) for v in values] if col == "label" else values
        rows.append(row)
    return pd.DataFrame(rows)


def labeling_dataset(plan: list[tuple[Shard, pd.DataFrame]], *, ensembles: dict[str, str],
                     stores: dict[str, SoftTargetStore], encoder_source: str, random_init: bool,
                     config_overrides: dict, seed: int, max_length: int, num_actors: int, cpus_per_actor: float,
                     torch_threads: int, batch_size: int, emit_rows: bool, gpus_per_actor: float = 0.0,
                     batch_tokens: int | None = None, precision: str = "fp32",
                     checkpoints: dict[str, list[CheckpointMember]] | None = None,
                     inject_oom_rows: int | None = None) -> ray.data.Dataset:
    """A lazy Ray Dataset whose execution labels and commits every shard of `plan`.

    One block per shard, so shards are spread over the actor pool and a retried task redoes one shard.
    emit_rows: the labeled rows (to stream into training), else one summary row per shard.
    gpus_per_actor: each actor's share of a GPU (0.25: four actors share one), 0 for CPU actors.
    batch_tokens: at most this many padded tokens per forward pass (None: batch_size rows, whatever their length).
    """
    frame = shard_rows(plan)
    ds = ray.data.from_pandas([frame.iloc[i:i + 1] for i in range(len(frame))])
    return ds.map_batches(
        ShardLabeler,
        fn_constructor_kwargs=dict(
            ensembles=ensembles, stores={t: (s.root, s.key) for t, s in stores.items()},
            encoder_source=encoder_source, random_init=random_init, config_overrides=config_overrides, seed=seed,
            max_length=max_length, torch_threads=torch_threads, batch_size=batch_size, emit_rows=emit_rows,
            batch_tokens=batch_tokens, precision=precision, checkpoints=checkpoints, inject_oom_rows=inject_oom_rows),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        **({"num_gpus": gpus_per_actor} if gpus_per_actor else {}),
        batch_size=1,
        batch_format="pandas",
    )


def pending(plan: list[tuple[Shard, pd.DataFrame]], stores: dict[str, SoftTargetStore]):
    """The shards of `plan` that have no valid commit yet."""
    return [(s, ex) for s, ex in plan if stores[s.task].commit_record(s) is None]


def run_labeling(plan, *, stores: dict[str, SoftTargetStore], progress_seconds: float = 10.0, log=print,
                 on_shard=None, **dataset_kwargs) -> dict:
    """Label the shards of `plan` that are not committed yet; blocks until all are committed.

    on_shard(summary_row) is called as each shard's summary arrives (tests interrupt the driver there).
    Returns {"planned", "already_committed", "labeled", "read_back", "rows", "seconds"}.
    """
    todo = pending(plan, stores)
    stats = {"planned": len(plan), "already_committed": len(plan) - len(todo), "labeled": 0, "read_back": 0,
             "rows": sum(s.rows for s, _ in todo), "seconds": 0.0}
    log(f"[labels] {len(plan)} shards planned, {stats['already_committed']} already in the store, "
        f"labeling {len(todo)} ({stats['rows']} examples)")
    if not todo:
        return stats
    started = time.perf_counter()
    ds = labeling_dataset(todo, stores=stores, emit_rows=False, **dataset_kwargs)
    with ProgressReporter(stores, total=stats["rows"], every=progress_seconds, log=log):
        for summary in ds.iter_rows():
            stats["labeled" if summary["relabeled"] else "read_back"] += 1
            if on_shard is not None:
                on_shard(summary)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats


class ProgressReporter:
    """Prints examples done, rate and ETA every `every` seconds, counted from the store's commit records.

    Works the same whether the driver consumes the labeling stream or Ray Train workers do.
    """

    def __init__(self, stores: dict[str, SoftTargetStore], *, total: int, every: float, log=print):
        self.stores, self.total, self.every, self.log = stores, total, every, log
        self._finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="labeling-progress")

    def __enter__(self):
        self._base = self._done()
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None and not self._finished:
            self.report()

    def _done(self) -> int:
        return sum(s.committed_rows() for s in self.stores.values())

    def report(self) -> int:
        done = min(self.total, self._done() - self._base)
        elapsed = time.perf_counter() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if np.isfinite(eta) else "?"
        self.log(f"[labels] {done}/{self.total} examples ({100 * done / max(1, self.total):.1f}%), "
                 f"{rate:.1f} ex/s, elapsed {elapsed:.0f}s, ETA {eta_text}")
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if self.report() >= self.total:
                    self._finished = True
                    return
            except Exception as e:  # a progress line must never break labeling
                self.log(f"[labels] progress unavailable: {e}")
