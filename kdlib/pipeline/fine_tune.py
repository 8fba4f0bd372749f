"""The fine_tune stage (MKD sec. 6.2): every task's student trained further on that task alone, from the
multi-task weights.

Its own stage, keyed by the distillation it starts from and its own settings: trying other fine-tuning
settings reuses the (much longer) multi-task distillation. One Ray Train run (same loss, workers and
fault tolerance) in which each step trains one task's own student: its branch (branched), or its own
copy of the end-to-end student.
"""

from __future__ import annotations

from pathlib import Path

from kdlib import storage
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.distill import (TRAIN_SPEC, Students, dev_rows, final_checkpoint, save_training,
                                    training_datasets)
from kdlib.pipeline.labels import Labels
from kdlib.stages import RESUMABLE, fingerprint
from kdlib.train_loop import run_distillation
from kdlib.train_spec import TrainSpec


def fine_tune(ctx, tasks: dict[str, TaskData], labels: Labels, distilled: Students) -> Students:
    """Fine-tune each task's student from the distill stage `distilled`; returns the fine-tuned students."""
    d = ctx.cfg.distill
    fp = fingerprint("fine_tune", storage.name(distilled.stage_dir), d.fine_tune_epochs, d.fine_tune_lr)
    ray_train = storage.child(ctx.cache.location("fine_tune", fp), RESUMABLE)  # kept when interrupted: resumed

    def run(out: Path) -> dict:
        ctx.log(f"[fine-tune] {d.fine_tune_epochs} epochs per task at lr {d.fine_tune_lr:g} from the multi-task "
                f"student ({storage.name(distilled.stage_dir)})")
        distilled_spec = TrainSpec.model_validate_json(
            storage.read_text_at(storage.child(distilled.stage_dir, TRAIN_SPEC)))
        spec = distilled_spec.model_copy(
            update={"epochs": d.fine_tune_epochs, "lr": d.fine_tune_lr, "schedule": "mtdnn", "per_task": True})
        gold_only = {n: tasks[n] for n in tasks if n not in labels.stores}
        result = run_distillation(datasets=training_datasets(labels, gold_only), spec=spec,
                                  num_workers=d.num_workers, cpus_per_worker=d.cpus_per_worker,
                                  max_failures=d.max_failures, storage_path=ray_train, name="fine_tune",
                                  init_weights=final_checkpoint(distilled.stage_dir), dev=dev_rows(tasks),
                                  gpus_per_worker=d.gpus_per_worker, backend=d.backend, log=ctx.log)
        return save_training(ctx, tasks, spec, result, out, stage="fine_tune")

    stage_dir = ctx.cache.run("fine_tune", fp, run)
    return Students(storage.child(stage_dir, "students"), stage_dir)
