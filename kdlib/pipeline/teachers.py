"""The teachers stage: each task's K-member ensemble by partial fine-tuning, one Ray task per task.

The ensemble of (task, L) is keyed by the encoder's weights, the task's data, L, the teacher settings
and the seed (`teacher_key`), so the distillation pipeline and the depth search (kdlib.tune) share one
trained ensemble per key: both build it through `train_teacher_ensemble`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from kdlib import storage
from kdlib.config import TeacherConfig
from kdlib.device import describe, device
from kdlib.encoder import EncoderRef
from kdlib.pipeline.data import TaskData
from kdlib.stages import fingerprint
from kdlib.teachers import train_ensemble

RESOURCE_FIELDS = {"cpus_per_task", "gpus_per_task"}  # how the work is scheduled, not what it computes


@dataclass(frozen=True)
class Teachers:
    """Where each taught task's ensemble artifact is (a storage location); untaught tasks are absent."""

    dirs: dict[str, str]

    def key(self, task: str) -> str:
        """The teachers stage fingerprint of `task`'s ensemble (its identity in the soft-target store)."""
        return storage.name(storage.parent(self.dirs[task]))


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
                           out_dir: str, *, members: int | None = None, precision: str = "fp32", log=print) -> dict:
    """kdlib.teachers.train_ensemble for one task, its settings taken from the typed config."""
    return train_ensemble(task=data.name, kind=data.kind, label_names=data.label_names, metric=data.metric,
                          train=data.train, encoder_source=encoder.source, random_init=encoder.random_init,
                          config_overrides=encoder.config_overrides, pooling=encoder.pooling,
                          max_length=encoder.max_length, fine_tune_layers=fine_tune_layers,
                          members=members or settings.members, epochs=settings.epochs,
                          batch_size=settings.batch_size, lr=settings.lr, head_lr=settings.head_lr,
                          weight_decay=settings.weight_decay, seed=encoder.seed, out_dir=out_dir, dev=data.dev,
                          precision=precision, log=log)


def _train_on_node(location: str, data: TaskData, encoder: EncoderRef, fine_tune_layers: int,
                   settings: TeacherConfig, precision: str) -> dict:
    """An ensemble into `<location>/ensemble` (uploaded from this node when the storage root is remote),
    reporting the node and device it ran on."""
    with storage.staged_dir(location) as out:
        info = train_teacher_ensemble(data, encoder, fine_tune_layers, settings, str(out / "ensemble"),
                                      precision=precision)
    dev = device()
    where = ray.util.get_node_ip_address() + ("" if dev.type == "cpu" else f", {describe(dev)}")
    return {**info, "where": where, "device": str(dev),
            "resources": ray.get_runtime_context().get_assigned_resources()}


def train_teachers(ctx, tasks: dict[str, TaskData]) -> Teachers:
    """One Ray task per task trains its K-member ensemble; tasks run concurrently; unchanged ones are reused."""
    cfg, cache = ctx.cfg, ctx.cache
    remote = ray.remote(num_cpus=cfg.teachers.cpus_per_task, num_gpus=cfg.teachers.gpus_per_task)(_train_on_node)
    dirs, running, started = {}, {}, time.perf_counter()
    for name, data in tasks.items():
        if not cfg.tasks[name].teacher:
            ctx.log(f"[teachers:{name}] none (teacher: false): the student learns it from gold labels")
            continue
        L = cfg.tasks[name].fine_tune_layers
        fp = teacher_key(ctx.encoder, data.digest, L, cfg.teachers, precision=cfg.precision)
        out, done = cache.begin("teachers", fp)
        dirs[name] = storage.child(out, "ensemble")
        if done:
            cache.reuse("teachers", fp, label=f"teachers:{name}")
            continue
        cache.start("teachers", out, label=f"teachers:{name}")
        running[name] = (fp, remote.remote(out, data, ctx.encoder, L, cfg.teachers, cfg.precision))
    for name, (fp, ref) in running.items():
        info = ray.get(ref)
        cache.finish("teachers", fp, time.perf_counter() - started, info, label=f"teachers:{name}")
    return Teachers(dirs)
