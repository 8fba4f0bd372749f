"""The labels stage: every teacher member's logits on each task's examples, in the soft-target store.

Per task, the examples to label (dev, train, masked copies, unlabeled text) go into a content-addressed
store (kdlib.soft_targets) keyed by the teachers, the data, the augmentation and the shard size; a Ray
Data actor pool (kdlib.labeling) labels and commits it shard by shard, so an interrupted run resumes
and a store another run completed is reused as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kdlib.augment import file_digest, masked_copies, read_unlabeled
from kdlib.labeling import run_labeling
from kdlib.pipeline.context import placement
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.teachers import Teachers
from kdlib.soft_targets import Shard, SoftTargetStore, carry_over, plan_shards
from kdlib.stages import StageCache, done_line, fingerprint, reuse_line


@dataclass
class Labels:
    """Each taught task's store, and the shards (with their examples) that fill them."""

    stores: dict[str, SoftTargetStore]
    plan: list[tuple[Shard, pd.DataFrame]]

    def shards(self, *, task: str | None = None, split: str | None = None) -> list[tuple[Shard, pd.DataFrame]]:
        return [(s, ex) for s, ex in self.plan
                if (task is None or s.task == task) and (split is None or s.split == split)]

    def complete(self) -> bool:
        return all(s.is_complete() for s in self.stores.values())

    def dev(self, task: str) -> pd.DataFrame:
        """A task's labeled dev rows: from the finished store, or its committed dev shards while it fills."""
        store = self.stores[task]
        return store.read(split="dev") if store.is_complete() else store.read_committed(
            [sh for sh, _ in self.shards(task=task, split="dev")])


def labeling_settings(ctx, teachers: Teachers) -> dict:
    """The labeling actors' arguments (kdlib.labeling.labeling_dataset)."""
    lab, enc = ctx.cfg.labeling, ctx.encoder
    return dict(ensembles=teachers.dirs, encoder_source=enc.source, random_init=enc.random_init,
                config_overrides=enc.config_overrides, seed=enc.seed, max_length=enc.max_length,
                num_actors=lab.num_actors, cpus_per_actor=lab.cpus_per_actor, torch_threads=lab.torch_threads,
                batch_size=lab.batch_size, batch_tokens=lab.batch_tokens, gpus_per_actor=lab.gpus_per_actor,
                precision=ctx.cfg.precision, checkpoints=teachers.checkpoints)


def plan_labels(ctx, tasks: dict[str, TaskData], teachers: Teachers) -> Labels:
    """Per taught task: the examples to label, their content-addressed store and its shard plan."""
    cfg = ctx.cfg
    mask_token = ctx.encoder.tokenizer().mask_token
    stores, plan = {}, []
    for name, data in tasks.items():
        t = cfg.tasks[name]
        if not t.teacher:
            continue
        parts = [data.dev, data.train,
                 masked_copies(data.train, copies=t.augment.copies, p=t.augment.mask_prob, seed=cfg.seed,
                               mask_token=mask_token)]
        unlabeled = None
        if t.unlabeled is not None:
            path = cfg.task_path(name, "unlabeled")
            parts.append(read_unlabeled(path, task=name, has_pair=t.text_pair_column is not None))
            unlabeled = file_digest(path)
        examples = pd.concat([p for p in parts if len(p)], ignore_index=True)
        key = fingerprint("soft-targets", teachers.key(name), data.digest, t.augment.model_dump(), unlabeled,
                          cfg.seed, cfg.encoder.max_length, cfg.labeling.shard_size)
        stores[name] = SoftTargetStore(cfg.storage_root, name, key)
        plan += plan_shards(name, examples, cfg.labeling.shard_size)
        if not stores[name].is_complete():  # a complete store is reused: label_tasks says so
            counts = examples["source"].value_counts().to_dict()
            ctx.log(f"[labels:{name}] {len(examples)} examples to label {counts} -> {stores[name].location}")
    return Labels(stores, plan)


def label_tasks(ctx, labels: Labels, teachers: Teachers, splits=("dev", "train")) -> None:
    """Fill the soft-target stores: label every planned shard of `splits` that is not committed yet.

    Complete stores (a manifest written by any earlier run with the same inputs) are reused as they are;
    shards whose examples another version labeled with the same teachers are copied from it (carry_over).
    Labeling both splits seals the stores (`finish_labels`).
    """
    stores = labels.stores
    todo = {name for name, store in stores.items() if not store.is_complete()}
    for name in stores.keys() - todo:
        _record(ctx, stores[name], cached=True, seconds=0.0)
    if not todo:
        return
    for name in sorted(todo):  # what another version of the store labeled with these teachers is copied
        carried = carry_over(stores[name], labels.plan, teachers=teachers.key(name),
                             max_length=ctx.encoder.max_length)
        if carried["shards"]:
            ctx.log(f"[labels:{name}] {carried['rows']} examples ({carried['shards']} shards) carried over from "
                    f"{', '.join(carried['from'])}: same teachers, not labeled again")
    stats = run_labeling([(s, ex) for s, ex in labels.plan if s.split in splits and s.task in todo], stores=stores,
                         progress_seconds=ctx.cfg.labeling.progress_seconds, log=ctx.log,
                         **labeling_settings(ctx, teachers))
    if set(splits) == {"dev", "train"}:
        finish_labels(ctx, labels, teachers, stats["seconds"])


def finish_labels(ctx, labels: Labels, teachers: Teachers, seconds: float) -> None:
    """Verify every shard of every store and write the manifests that make the stores readable."""
    for name, store in labels.stores.items():
        if store.is_complete():
            continue
        t = ctx.cfg.tasks[name]
        manifest = store.finalize([s for s, _ in labels.shards(task=name)], {
            "teachers": teachers.manifest(name, ctx.cfg.teachers.members),
            "augment": t.augment.model_dump(), "unlabeled": t.unlabeled, "max_length": ctx.encoder.max_length})
        where = _record(ctx, store, cached=False, seconds=seconds)
        ctx.log(done_line(f"labels:{name}", seconds, where,
                          f"{manifest['rows']} examples in the store {manifest['rows_by_split']}"))


def _record(ctx, store: SoftTargetStore, *, cached: bool, seconds: float) -> str:
    """The store in the run summary (once); returns where its shards were labeled."""
    cache: StageCache = ctx.cache
    where = "reused" if cached else placement([r.get("node") for r in store.commit_records()], "shard")
    if not any(r.name == "labels" and r.fingerprint == store.key for r in cache.records):
        if cached:
            ctx.log(reuse_line(f"labels:{store.task}", store.location))
        cache.record("labels", store.key, store.location, cached=cached, seconds=seconds, where=where)
    return where
