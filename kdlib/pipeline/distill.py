"""The distill stage: all tasks' students trained together on Ray Train (kdlib.train_loop).

The training rows come from the soft-target stores, or with `labeling.stream` straight from the labeling
actors while they label (and commit) the training shards; tasks without a teacher train on their gold
labels. After every epoch the workers score each task's dev rows. The stage is keyed by the stores, the
gold-only data and the `TrainSpec`; its folder holds the Ray Train checkpoints (`ray_train/`),
`train_spec.json`, `train_report.json`, `history.json` (every epoch's losses, learning rate and dev scores:
the run's curves, kdlib.curves), `final_checkpoint.json` and the students (`students/`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import ray
from ray.train import Checkpoint

from kdlib import storage
from kdlib.artifact import save_model
from kdlib.branched import member_name
from kdlib.dev_scoring import DevRows
from kdlib.errors import ConfigError
from kdlib.scoring import member_scores
from kdlib.labeling import ProgressReporter, labeling_dataset, pending
from kdlib.merge import single_task
from kdlib.pipeline.context import placement
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.labels import Labels, finish_labels, labeling_settings
from kdlib.pipeline.teachers import Teachers
from kdlib.soft_targets import gold_only_dataset, teacher_logits_array
from kdlib.stages import RESUMABLE, fingerprint
from kdlib.students.artifact import save_student
from kdlib.students.binning import ScoreBins
from kdlib.train_loop import load_trained_student, run_distillation
from kdlib.train_spec import StudentSpec, TaskSpec, TrainSpec
from kdlib.trainees import BRANCHED, saved_hparams

FINAL_CHECKPOINT = "final_checkpoint.json"  # a distill stage's last Ray Train checkpoint, named below ray_train/
TRAIN_SPEC = "train_spec.json"  # what the workers trained with
HISTORY = "history.json"  # every epoch's metrics: {"stage": ..., "epochs": [kdlib.train_loop.history_row, ...]}


@dataclass(frozen=True)
class Students:
    """The trained students' folder (`<stage>/students`): per-task branches (branched), `multitask/`, or
    one fine-tuned copy per task; and the stage folder it belongs to."""

    dir: str
    stage_dir: str


def task_spec(ctx, data: TaskData, labels: Labels, teachers: Teachers) -> TaskSpec:
    """What the training loop needs to know about one task: its head, branch, loss and teacher."""
    t = ctx.cfg.tasks[data.name]
    common = dict(kind=data.kind, pair=t.text_pair_column is not None, bins=t.bins,
                  num_outputs=data.num_outputs if t.bins is None else ScoreBins(*t.bins).num_bins,
                  branch_layers=t.branch_layers, fine_tune_layers=t.fine_tune_layers,
                  aggregation=t.resolved_aggregation, wrong_teacher_weight=t.wrong_teacher_weight)
    if data.name not in labels.stores:  # no teacher: gold labels only, the branch from the encoder's own layers
        return TaskSpec(**common, objective="hard")
    objective = t.objective or ctx.cfg.distill.objective
    if data.name in teachers.checkpoints:  # the user's own teachers: the branch from the encoder's own layers
        return TaskSpec(**common, objective=objective)
    # The student branch starts from the ensemble member with the best dev score.
    dev = labels.dev(data.name)
    members = member_scores(data.kind, data.metric, dev["label"].to_numpy(), teacher_logits_array(dev))
    best = max(range(len(members)), key=members.__getitem__)
    return TaskSpec(**common, objective=objective, ensemble_dir=teachers.dirs[data.name],
                    init_member=member_name(data.name, best))


def train_spec(ctx, tasks: dict[str, TaskData], labels: Labels, teachers: Teachers) -> TrainSpec:
    cfg, d = ctx.cfg, ctx.cfg.distill
    return TrainSpec(
        tasks={name: task_spec(ctx, data, labels, teachers) for name, data in tasks.items()},
        encoder=ctx.encoder, student=StudentSpec(kind=cfg.student.kind, hparams=cfg.student.hparams()),
        per_task=d.per_task_students, precision=cfg.precision,
        **d.model_dump(include={"epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "temperature", "alpha",
                                "torch_threads", "teacher_annealing", "schedule", "sampling_tau", "road_k"}))


def distill_students(ctx, tasks: dict[str, TaskData], labels: Labels, teachers: Teachers) -> Students:
    """Ray Train distils all tasks' students together; each task's student is saved as its own artifact."""
    cfg, d = ctx.cfg, ctx.cfg.distill
    spec = train_spec(ctx, tasks, labels, teachers)
    gold_only = {n: tasks[n] for n in tasks if n not in labels.stores}
    # num_workers enters the key: each worker's batches make one global batch per step.
    fp = fingerprint("students", {n: s.key for n, s in labels.stores.items()},
                     {n: t.digest for n, t in gold_only.items()}, spec.key(), d.num_workers)
    # Checkpoints go straight to storage, and stay when the stage is interrupted: a rerun resumes from them.
    ray_train = storage.child(ctx.cache.location("distill", fp), RESUMABLE)

    def run(out: Path) -> dict:
        streaming = cfg.labeling.stream and not labels.complete()
        if streaming:
            check_stream_fits(cfg)
            train_plan = labels.shards(split="train")
            ctx.log(f"[distill] streaming {sum(s.rows for s, _ in train_plan)} training rows from the labeling "
                    f"actors into Ray Train (committed shards are read back, not relabeled)")
            datasets = {"stream": labeling_dataset(train_plan, stores=labels.stores, emit_rows=True,
                                                   **labeling_settings(ctx, teachers)),
                        **gold_only_datasets(gold_only)}
            progress = ProgressReporter(labels.stores, total=sum(s.rows for s, _ in pending(train_plan, labels.stores)),
                                        every=cfg.labeling.progress_seconds, log=ctx.log)
        else:
            datasets = training_datasets(labels, gold_only)
            progress = contextlib.nullcontext()
        started = time.perf_counter()
        with progress:
            result = run_distillation(datasets=datasets, spec=spec, num_workers=d.num_workers,
                                      cpus_per_worker=d.cpus_per_worker, max_failures=d.max_failures,
                                      storage_path=ray_train, name="distill", dev=dev_rows(tasks),
                                      gpus_per_worker=d.gpus_per_worker, backend=d.backend, log=ctx.log)
        if streaming:
            finish_labels(ctx, labels, teachers, time.perf_counter() - started)
        # Where the final weights are, for a fine-tuning stage that starts from them in this run or a later one.
        (out / FINAL_CHECKPOINT).write_text(json.dumps({"checkpoint": checkpoint_name(result.checkpoint)}))
        return save_training(ctx, tasks, spec, result, out, stage="distill")

    stage_dir = ctx.cache.run("distill", fp, run)
    return Students(storage.child(stage_dir, "students"), stage_dir)


def training_datasets(labels: Labels, gold_only: dict[str, TaskData]) -> dict:
    """One Ray Dataset per task: its store's training rows, or its gold-labeled rows if it has no teacher."""
    return {**{name: store.dataset(split="train") for name, store in labels.stores.items()},
            **gold_only_datasets(gold_only)}


def dev_rows(tasks: dict[str, TaskData]) -> dict[str, DevRows]:
    """Each task's dev examples and primary metric, for the workers' per-epoch dev score (the same rows the
    soft-target store labels, and the evaluate stage scores)."""
    return {name: DevRows.from_frame(data.dev, data.metric) for name, data in tasks.items()}


def gold_only_datasets(gold_only: dict[str, TaskData]) -> dict:
    return {name: gold_only_dataset(name, data.train) for name, data in gold_only.items()}


def checkpoint_name(checkpoint: Checkpoint) -> str:
    """A Ray Train checkpoint's place below its stage's `ray_train` folder: `<run name>/<checkpoint dir>`."""
    return "/".join(PurePosixPath(checkpoint.path).parts[-2:])


def final_checkpoint(stage_dir: str) -> Checkpoint:
    """The last Ray Train checkpoint of a distill stage (on its storage, local or remote)."""
    name = json.loads(storage.read_text_at(storage.child(stage_dir, FINAL_CHECKPOINT)))["checkpoint"]
    fs, path = storage.filesystem(storage.child(stage_dir, "ray_train", *name.split("/")))
    return Checkpoint(path, filesystem=fs)


def save_training(ctx, tasks: dict[str, TaskData], spec: TrainSpec, result, out: Path, *, stage: str) -> dict:
    """A finished Ray Train run into its stage folder `out`: its spec, report, history and students; the
    stage's facts."""
    (out / TRAIN_SPEC).write_text(spec.model_dump_json(indent=1))
    write_train_report(result, out / "train_report.json")
    # Rank 0's return value: every epoch's metrics (Result.metrics_dataframe holds only the kept checkpoints').
    (out / HISTORY).write_text(json.dumps({"stage": stage, "epochs": result.return_value}, indent=1))
    save_students(ctx, tasks, spec, result.checkpoint, out / "students")
    devices = sorted(set(result.metrics["placement/devices"]))
    where = placement(result.metrics["placement/nodes"], "train worker")
    return {"where": where if devices == ["cpu"] else f"{where}, {', '.join(devices)}"}


def write_train_report(result, path: Path) -> None:
    """What the workers trained on (rows, duplicates, ids digest per task), whether their replicas ended
    identical, how long the last epoch took, its last step and that step's learning rate, from the last epoch's
    metrics (tests and benchmarks read it)."""
    path.write_text(json.dumps({k: v for k, v in result.metrics.items()
                                if k.split("/")[0] in ("rows", "duplicates", "ids", "replicas", "placement", "epoch",
                                                       "step", "lr", "seconds")}))


def save_students(ctx, tasks: dict[str, TaskData], spec: TrainSpec, checkpoint, folder: Path) -> None:
    """The trained student(s) as artifacts under `folder`.

    branched: one trunk-less artifact per task (`<task>/`), merged by the next stage. End-to-end students:
    `multitask/` (one model, every task's head), or after per-task fine-tuning one copy per task (`<task>/`)."""
    facts = task_facts(ctx, tasks)
    model = load_trained_student(checkpoint, spec)
    enc = ctx.encoder.manifest()
    if spec.student.kind == BRANCHED:
        for name in tasks:
            save_model(single_task(model, name), folder / name, include_trunk=False, tasks={name: facts[name]},
                       extra={"role": "student", "encoder": enc})
        return
    extra = {"role": "student", "encoder": enc, "max_length": spec.max_length,
             "config": ctx.cfg.model_dump(mode="json")}
    students = {n: (model[n], [n]) for n in tasks} if spec.per_task else {"multitask": (model, list(tasks))}
    for key, (student, names) in students.items():
        save_student(student, folder / key, name=spec.student.kind, hparams=saved_hparams(spec, student),
                     tasks={n: facts[n] for n in names}, extra=extra)


def task_facts(ctx, tasks: dict[str, TaskData]) -> dict[str, dict]:
    """What an artifact's manifest records of each task it serves; `pair`: whether the task reads a sentence
    pair (its config has a text_pair_column), which the server requires or refuses `text_pair` by."""
    return {n: {"kind": t.kind, "label_names": t.label_names, "metric": t.metric,
                "pair": ctx.cfg.tasks[n].text_pair_column is not None} for n, t in tasks.items()}


def check_stream_fits(cfg) -> None:
    """Streaming runs the labeling actors and the train workers at once: their CPUs must fit together."""
    lab, d = cfg.labeling, cfg.distill
    need = lab.num_actors * lab.cpus_per_actor + d.num_workers * d.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"labeling.stream=true runs {lab.num_actors} labeling actors x {lab.cpus_per_actor} CPU "
                          f"and {d.num_workers} train workers x {d.cpus_per_worker} CPU at once ({need:g} CPUs) but "
                          f"the cluster has {have:g}; lower labeling.cpus_per_actor / distill.cpus_per_worker")
