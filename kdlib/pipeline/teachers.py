"""The teachers stage: each task's K-member ensemble by partial fine-tuning, one Ray task per task, or the
user's own fine-tuned checkpoints (`tasks.<t>.teacher_checkpoints`), checked and fingerprinted here.

The ensemble of (task, L) is keyed by the encoder's weights, the task's data, L, the teacher settings
and the seed (`teacher_key`), so the distillation pipeline and the depth search (kdlib.tune) share one
trained ensemble per key: both build it through `train_teacher_ensemble`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from kdlib import storage
from kdlib.artifact import load_model
from kdlib.config import TeacherConfig
from kdlib.device import describe, device
from kdlib.encoder import EncoderRef
from kdlib.pipeline.data import TaskData
from kdlib.stages import fingerprint
from kdlib.teacher_checkpoints import CheckpointMember, resolve_members
from kdlib.teacher_export import export_ensemble
from kdlib.teachers import train_ensemble

RESOURCE_FIELDS = {"cpus_per_task", "gpus_per_task"}  # how the work is scheduled, not what it computes
CHECKPOINTS = "checkpoints"  # beside `ensemble/`: every member as a transformers checkpoint (kdlib.teacher_export)


@dataclass(frozen=True)
class Teachers:
    """Each taught task's teachers: a kdlib-trained ensemble artifact (`dirs`: a storage location) or the user's
    checkpoints (`checkpoints`: resolved members, `checkpoint_keys`: their fingerprint); untaught tasks are in
    neither."""

    dirs: dict[str, str]
    checkpoints: dict[str, list[CheckpointMember]] = field(default_factory=dict)
    checkpoint_keys: dict[str, str] = field(default_factory=dict)

    def key(self, task: str) -> str:
        """The fingerprint of `task`'s teachers (their identity in the soft-target store)."""
        if task in self.checkpoints:
            return self.checkpoint_keys[task]
        return storage.name(storage.parent(self.dirs[task]))

    def manifest(self, task: str, members: int) -> dict:
        """What a soft-target store's manifest records of its teachers."""
        if task in self.checkpoints:
            return {"fingerprint": self.key(task), "checkpoints": [m.record() for m in self.checkpoints[task]]}
        return {"dir": self.dirs[task], "fingerprint": self.key(task), "members": members}


def checkpoints_key(members: list[CheckpointMember], precision: str) -> str:
    """The identity of a task's external teachers: every member's name, weights digest, label order and length
    limit (a changed checkpoint relabels, an unchanged one is reused), and a precision other than fp32."""
    return fingerprint("teacher-checkpoints", [m.identity() for m in members],
                       *([] if precision == "fp32" else [precision]))


def teacher_key(encoder: EncoderRef, data_digest: str, fine_tune_layers: int, settings: TeacherConfig,
                members: int | None = None, precision: str = "fp32") -> str:
    """The cache key of a (task, L) ensemble; `members` overrides settings.members (the depth search's
    one-member full fine-tuning reference). fp32 adds nothing to the key, so keys from before the precision
    setting stay valid; bf16 and fp16 train different weights and key them apart."""
    teachers = settings.model_dump(exclude=RESOURCE_FIELDS)
    if members is not None:
        teachers["members"] = members
    return fingerprint("teachers", encoder.fingerprint, data_digest, fine_tune_layers, teachers, encoder.pooling,
                       encoder.max_length, encoder.seed, *([] if precision == "fp32" else [precision]))


def train_teacher_ensemble(data: TaskData, encoder: EncoderRef, fine_tune_layers: int, settings: TeacherConfig,
                           out_dir: str, *, members: int | None = None, precision: str = "fp32",
                           checkpoints_dir: str | None = None, log=print) -> dict:
    """kdlib.teachers.train_ensemble for one task, its settings taken from the typed config."""
    return train_ensemble(task=data.name, kind=data.kind, label_names=data.label_names, metric=data.metric,
                          train=data.train, encoder_source=encoder.source, random_init=encoder.random_init,
                          config_overrides=encoder.config_overrides, pooling=encoder.pooling,
                          max_length=encoder.max_length, fine_tune_layers=fine_tune_layers,
                          members=members or settings.members, epochs=settings.epochs,
                          batch_size=settings.batch_size, lr=settings.lr, head_lr=settings.head_lr,
                          weight_decay=settings.weight_decay, seed=encoder.seed, out_dir=out_dir, dev=data.dev,
                          precision=precision, checkpoints_dir=checkpoints_dir, log=log)


def _train_on_node(location: str, data: TaskData, encoder: EncoderRef, fine_tune_layers: int,
                   settings: TeacherConfig, precision: str) -> dict:
    """An ensemble into `<location>/ensemble` and its members as transformers checkpoints into
    `<location>/checkpoints/<member>/` (uploaded from this node when the storage root is remote), reporting the
    node and device it ran on."""
    with storage.staged_dir(location) as out:
        info = train_teacher_ensemble(data, encoder, fine_tune_layers, settings, str(out / "ensemble"),
                                      precision=precision, checkpoints_dir=str(out / CHECKPOINTS))
    dev = device()
    where = ray.util.get_node_ip_address() + ("" if dev.type == "cpu" else f", {describe(dev)}")
    return {**info, "where": where, "device": str(dev),
            "resources": ray.get_runtime_context().get_assigned_resources()}


def train_teachers(ctx, tasks: dict[str, TaskData]) -> Teachers:
    """One Ray task per task trains its K-member ensemble; tasks run concurrently; unchanged ones are reused.
    Tasks with teacher_checkpoints train none: their checkpoints are checked against the task and fingerprinted
    (ConfigError before any labeling when one does not fit)."""
    cfg, cache = ctx.cfg, ctx.cache
    remote = ray.remote(num_cpus=cfg.teachers.cpus_per_task, num_gpus=cfg.teachers.gpus_per_task)(_train_on_node)
    export = ray.remote(num_cpus=cfg.teachers.cpus_per_task)(_export_on_node)
    exportable = ctx.encoder.config().model_type == "bert"  # kdlib.teacher_export writes BERT-family teachers
    dirs, running, started, exports = {}, {}, time.perf_counter(), []
    checkpoints, keys = {}, {}
    for name, data in tasks.items():
        t = cfg.tasks[name]
        if not t.teacher:
            ctx.log(f"[teachers:{name}] none (teacher: false): the student learns it from gold labels")
            continue
        if t.teacher_checkpoints is not None:
            members = resolve_members(task=name, kind=data.kind, label_names=data.label_names,
                                      checkpoints=t.teacher_checkpoints, label_map=t.teacher_label_map,
                                      max_length=ctx.encoder.max_length)
            checkpoints[name], keys[name] = members, checkpoints_key(members, cfg.precision)
            ctx.log(f"[teachers:{name}] {len(members)} checkpoints, not trained here: "
                    + ", ".join(f"{m.name} ({m.family}, {m.digest[:8]})" for m in members))
            continue
        L = cfg.tasks[name].fine_tune_layers
        fp = teacher_key(ctx.encoder, data.digest, L, cfg.teachers, precision=cfg.precision)
        out, done = cache.begin("teachers", fp)
        dirs[name] = storage.child(out, "ensemble")
        if done:
            cache.reuse("teachers", fp, label=f"teachers:{name}")
            if exportable and not storage.exists_at(storage.child(out, CHECKPOINTS)):  # trained by the depth
                exports.append(export.remote(out, data, ctx.encoder))  # search, which writes no checkpoints
            continue
        cache.start("teachers", out, label=f"teachers:{name}")
        running[name] = (fp, remote.remote(out, data, ctx.encoder, L, cfg.teachers, cfg.precision))
    for name, (fp, ref) in running.items():
        info = ray.get(ref)
        cache.finish("teachers", fp, time.perf_counter() - started, info, label=f"teachers:{name}")
    ray.get(exports)
    return Teachers(dirs, checkpoints, keys)


def _export_on_node(location: str, data: TaskData, encoder: EncoderRef) -> None:
    """`<location>/checkpoints/` from the ensemble at `<location>/ensemble` (kdlib.teacher_export)."""
    ensemble, _ = load_model(storage.local_copy(storage.child(location, "ensemble")), encoder=encoder.load())
    with storage.staged_dir(storage.child(location, CHECKPOINTS)) as out:
        export_ensemble(ensemble, out, kind=data.kind, label_names=data.label_names, tokenizer=encoder.tokenizer())
