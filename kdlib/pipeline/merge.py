"""The merge stage: the branched students onto one trunk, the encoder's layers up to the deepest branch
point run once for all tasks, every task's branch at its depth (flexible-multitask-bert-serving sec. 3.3)."""

from __future__ import annotations

from pathlib import Path

import ray

from kdlib import storage
from kdlib.artifact import load_model, save_model
from kdlib.merge import merge
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.distill import Students, task_facts
from kdlib.stages import fingerprint


def merge_students(ctx, tasks: dict[str, TaskData], students: Students) -> str:
    """One artifact (`<stage>/model`) serving every task; returns its location."""
    fp = fingerprint("merge", storage.name(students.stage_dir))

    def run(out: Path) -> dict:
        encoder = ctx.encoder.load()
        parts = [load_model(storage.local_copy(students.dir) / name, encoder=encoder)[0] for name in tasks]
        merged = merge(encoder, parts, ctx.encoder.pooling)
        save_model(merged, out / "model", tasks=task_facts(ctx, tasks),
                   extra={"role": "merged", "encoder": ctx.encoder.manifest(), "max_length": ctx.encoder.max_length,
                          "config": ctx.cfg.model_dump(mode="json")})
        return {"where": f"driver ({ray.util.get_node_ip_address()})"}

    return storage.child(ctx.cache.run("merge", fp, run), "model")
