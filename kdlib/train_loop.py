"""Multi-task student distillation on Ray Train (TorchTrainer, CPU, gloo).

The soft-target rows come as Ray Datasets: one per task read from the soft-target store, or one stream
straight from the labeling actors while they label. Ray Train splits them across workers without
dropping a row (worker_shares.py); each worker builds the student (kdlib/trainees.py: the branched
student, whose frozen trunk runs once over the rows as they arrive, or a small transformer / BiLSTM /
CMOW student trained end to end), and then trains:
every step takes one task's batch, the schedule (MT-DNN Algorithm 1, |D_t|^tau sampling, or ROaD's k tasks per step: schedules.py) drawn from a
seed shared by all workers, so every replica updates the same branches in the same step. Loss: the
task's objective (KL with temperature, MSE on logits, soft cross-entropy, or hard labels only) against
its aggregated teachers, mixed with the hard-label loss by alpha or by teacher annealing (losses.py). After
every epoch the workers score each task's dev rows (dev_scoring.py) and report the epoch's losses, learning
rate and dev scores; a checkpoint is written every epoch, and a restarted worker group resumes from the last
one. Rank 0 returns every epoch's metrics (the run's history), which Ray Train hands the driver as
`Result.return_value`.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.dataset import MaterializedDataset
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from kdlib import storage
from kdlib.dev_scoring import DevRows, dev_features, dev_metrics, dev_outputs
from kdlib.device import describe, model_device, out_of_memory_names
from kdlib.features import length_grouped_batches
from kdlib.losses import (
    binned_regression_loss,
    distillation_loss,
    teacher_annealing_weight,
)
from kdlib.optim import Optimization
from kdlib.schedules import mtdnn_schedule, road_schedule, temperature_sampling_schedule
from kdlib.soft_targets import ids_digest, teacher_logits_array
from kdlib.students.binning import ScoreBins
from kdlib.train_progress import fit
from kdlib.train_spec import TaskSpec, TrainSpec
from kdlib.train_state import load_train_state, load_weights, save_train_state
from kdlib.trainees import make_trainee
from kdlib.worker_shares import LosslessSplit, in_worker_blocks


@dataclass
class TaskRows:
    """One task's training rows on one worker: the trainee's features plus targets, in arrival order."""

    ids: list = field(default_factory=list)
    features: list = field(default_factory=list)  # per example: trunk states (branched) or token ids
    labels: list = field(default_factory=list)  # float, NaN where there is no gold label
    logits: list = field(default_factory=list)  # (K, C) every teacher's logits

    def tensors(self, trainee) -> tuple:
        return (trainee.collate(self.features), torch.tensor(self.labels, dtype=torch.float32),
                torch.from_numpy(np.stack(self.logits)) if self.logits else torch.zeros(0, 1, 1))


def ingest(rows_iter, trainee, data: dict[str, TaskRows], *, max_length: int) -> None:
    """Consume this worker's share of the soft-target rows (streamed from labeling or read from the store).

    Each arriving batch becomes the trainee's features right away (the branched student runs its frozen
    trunk over it), so this work overlaps with labeling when the rows are streamed. Rows are appended to
    `data[task]`.
    """
    for batch in rows_iter.iter_batches(batch_size=256, batch_format="pandas"):
        for task, part in batch.groupby("task", sort=False):
            if task not in data:
                raise ValueError(f"soft-target rows of task {task!r}, which this run does not train")
            feats = trainee.features(task, part["text"].tolist(), part["text_pair"].tolist(), max_length)
            d = data[task]
            d.ids += part["id"].tolist()
            d.features += feats
            d.labels += pd.to_numeric(part["label"], errors="coerce").astype("float64").tolist()
            d.logits += list(teacher_logits_array(part))


def rows_seen(data: dict[str, TaskRows], world: int) -> dict[str, float | str]:
    """Rows and a digest of the sorted ids each task trained on, over all workers (the same on every rank)."""
    local = {t: d.ids for t, d in data.items()}
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    out = {}
    for task in data:
        ids = [i for g in gathered for i in g[task]]
        out[f"rows/{task}"] = len(ids)
        out[f"duplicates/{task}"] = len(ids) - len(set(ids))
        out[f"ids/{task}"] = ids_digest(sorted(ids))
    return out


def replica_digests(params, world: int) -> list[str]:
    """Every worker's SHA-256 of its trainable parameters (all equal when the replicas stay identical)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return gather(h.hexdigest()[:16], world)


def gather(value, world: int) -> list:
    """Every worker's `value`, in rank order (the same list on every rank)."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker receives (as `train_loop_config={"job": ...}`)."""

    spec: TrainSpec
    datasets: list[str]  # the Ray Train dataset names whose shards hold this run's rows
    init_weights: Checkpoint | None = None  # per-task fine-tuning starts from the multi-task student
    # Each task's dev rows, scored after every epoch (`dev/<task>`); empty: no dev scoring.
    dev: dict[str, DevRows] = field(default_factory=dict)


# Per-epoch metrics that go into the run's history (the rest, e.g. the replica digests, only into the report).
HISTORY_KEYS = ("epoch", "step", "seconds", "lr")


def history_row(metrics: dict) -> dict:
    """The scalars of one epoch's metrics that the curves show: epoch, step, seconds, lr, loss/*, dev/*."""
    return {k: v for k, v in metrics.items() if k in HISTORY_KEYS or k.split("/")[0] in ("loss", "dev")}


def train_loop_per_worker(config: dict) -> list[dict]:
    """Ray Train worker: build the student, ingest this worker's rows, train with per-epoch checkpoints.

    Returns every epoch's `history_row` (a resumed run's earlier epochs from its checkpoint)."""
    job: WorkerJob = config["job"]
    spec = job.spec
    torch.set_num_threads(spec.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    trainee = make_trainee(spec)  # on the GPU Ray Train assigned this worker, else the CPU
    student = trainee.model
    opt = Optimization([p for p in student.parameters() if p.requires_grad], lr=spec.lr,
                       weight_decay=spec.weight_decay, schedule=spec.lr_schedule, precision=spec.precision,
                       device=model_device(student))
    start_epoch, starts, history = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = load_train_state(d, student, opt.optimizer)
        start_epoch, opt.steps_done, starts = meta["epoch"], meta["step"], meta["starts"]
        history = meta.get("history", [])
        if rank == 0:
            print(f"[distill] resuming from checkpoint after epoch {start_epoch} (step {opt.steps_done})", flush=True)
    elif job.init_weights is not None:  # fine-tuning starts from the multi-task student
        with job.init_weights.as_directory() as d:
            trainee.start_from(d)
    starts = starts + [start_epoch]  # the epoch each attempt started from: [0, 2] = resumed after epoch 2
    # This worker's rows of every task, ingested once into the trainee's features (the branched student's
    # frozen trunk states, computed on arrival, serve every epoch).
    ingest_start = time.perf_counter()
    rows = {t: TaskRows() for t in spec.tasks}
    for name in job.datasets:
        ingest(ray.train.get_dataset_shard(name), trainee, rows, max_length=spec.max_length)
    seen = rows_seen(rows, world)
    # This worker's share of each task's dev rows, as features once (the trunk states of the branched student).
    dev = dev_features(job.dev, trainee, rank=rank, world=world, max_length=spec.max_length)
    nodes = gather(ray.util.get_node_ip_address(), world)  # where each rank runs, for the placement report
    devices = gather(describe(model_device(student)), world)
    gpus = gather(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0), world)  # what Ray gave
    data = {t: rows[t].tensors(trainee) for t in spec.tasks}
    if rank == 0:
        print(f"[distill] ingested {sum(int(seen[f'rows/{t}']) for t in spec.tasks)} rows in "
              f"{time.perf_counter() - ingest_start:.1f}s; training on {describe(model_device(student))} "
              f"in {spec.precision}", flush=True)

    def score() -> dict:
        outputs = {t: np.concatenate(gather(o, world)) for t, o in dev_outputs(trainee, spec.tasks, dev).items()}
        return dev_metrics(outputs, job.dev, spec.tasks)

    def report(metrics: dict) -> None:
        history.append(history_row(metrics))
        metrics = {**metrics, "start_epoch": start_epoch, **seen, "placement/nodes": nodes,
                   "placement/devices": devices, "placement/gpus": gpus}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_train_state(tmp, student, opt.optimizer, {"epoch": metrics["epoch"], "step": metrics["step"],
                                                               "starts": starts, "history": history})
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)  # the driver prints the epoch's line (kdlib.train_progress)

    run_epochs(trainee, data, spec, opt, rank=rank, world=world, start_epoch=start_epoch, on_epoch=report,
               score=score if job.dev else None)
    return history


def run_epochs(trainee, data: dict[str, tuple], spec: TrainSpec, opt: Optimization, *, rank: int = 0,
               world: int = 1, start_epoch: int = 0, on_epoch=None, score=None) -> None:
    """The multi-task training loop from `start_epoch` to `spec.epochs` on one worker of `world` (1: a plain
    single process); `on_epoch(metrics)` after each epoch, its metrics extended by `score()`'s (the dev
    scores) when given. `opt.steps_done` counts the steps (a resumed run restores it from its checkpoint).

    Args:
        data: per task, (features, labels (N,), teacher logits (N, K, C)) from TaskRows.tensors.
    """
    tasks = spec.tasks
    student = trainee.model
    # Workers may hold different numbers of a task's rows: each takes as many batches as the largest
    # share needs (its own batches a little smaller), so all follow one schedule and use every row.
    counts = torch.tensor([len(data[t][0]) for t in tasks], dtype=torch.long, device=model_device(student))
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    bs = spec.batch_size
    n_batches = {t: math.ceil(int(n) / bs) for t, n in zip(tasks, counts)}

    # Schedules may draw a task more often than its batches in an epoch; then its batches are refilled
    # (the same step on every worker, as every worker holds n_batches[t] of them per refill).
    total_batches = sum(n_batches.values())
    k = spec.road_k if spec.schedule == "road" else 1
    steps_per_epoch = math.ceil(total_batches / k)
    opt.total_steps = spec.epochs * steps_per_epoch
    sizes = {t: max(1, int(n)) for t, n in zip(tasks, counts)}

    for epoch in range(start_epoch, spec.epochs):
        epoch_start = time.perf_counter()
        shared = np.random.default_rng([spec.seed, epoch])  # same on every worker
        local = np.random.default_rng([spec.seed, epoch, rank])

        def fresh(t):
            return length_grouped_batches(data[t][0].lengths, bs, local, n_batches=n_batches[t])

        batches = {t: fresh(t) for t in tasks}
        schedule = epoch_schedule(spec, n_batches, sizes, steps_per_epoch, shared)
        losses: dict[str, list[float]] = {t: [] for t in tasks}
        lr = opt.optimizer.param_groups[0]["lr"]
        student.train()
        for i, step_tasks in enumerate(schedule):
            opt.zero_grad()
            hard_weight = (teacher_annealing_weight(opt.steps_done, opt.total_steps) if spec.teacher_annealing
                           else None)
            step_rows = 0
            for task in step_tasks:
                if not batches[task]:
                    batches[task] = fresh(task)
                idx = batches[task].pop()
                if len(idx):
                    with out_of_memory_names(spec.batch_size_setting, bs, task, model_device(student)):
                        loss = task_loss(trainee, task, tasks[task], data[task], idx, spec, hard_weight)
                        opt.backward(loss / len(step_tasks))  # ROaD: the step averages its tasks' gradients
                    losses[task].append(loss.item())
                average_gradients(trainee.task_parameters(task), world, weight=len(idx))
                step_rows += len(idx)
            average_gradients(trainee.shared_parameters(), world, weight=step_rows)
            lr = opt.step()
            if rank == 0 and (i + 1) % spec.log_every == 0 and losses[step_tasks[-1]]:
                print(f"[distill] epoch {epoch + 1}/{spec.epochs} step {i + 1}/{len(schedule)} "
                      f"{'+'.join(step_tasks)} loss {losses[step_tasks[-1]][-1]:.4f}", flush=True)
        digests = replica_digests(opt.params, world)
        metrics = {"epoch": epoch + 1, "step": opt.steps_done, "seconds": round(time.perf_counter() - epoch_start, 2),
                   "lr": lr,
                   "replicas/identical": len(set(digests)) == 1, "replicas/digests": digests,
                   **{f"loss/{t}": float(np.mean(v)) if v else float("nan") for t, v in losses.items()}}
        if score is not None:  # after the digest: the epoch's seconds and weights are the training's alone
            metrics.update(score())
        if on_epoch is not None:
            on_epoch(metrics)


def epoch_schedule(spec: TrainSpec, n_batches: dict[str, int], sizes: dict[str, int], steps: int,
                   rng: np.random.Generator) -> list[tuple[str, ...]]:
    """The tasks of every step of one epoch (the same on every worker: `rng` is seeded alike)."""
    if spec.schedule == "mtdnn":
        return [(t,) for t in mtdnn_schedule(n_batches, rng)]
    if spec.schedule == "sampling":
        return [(t,) for t in temperature_sampling_schedule(sizes, spec.sampling_tau, steps, rng)]
    return road_schedule(list(n_batches), spec.road_k, steps, rng)


def task_loss(trainee, task: str, t: TaskSpec, data, idx, spec: TrainSpec,
              hard_weight: float | None = None) -> torch.Tensor:
    """One mini-batch's loss for one task: its objective against its aggregated teachers (losses.py)."""
    feats, labels, logits = data
    out = trainee.forward(task, feats, idx).float()  # the loss in fp32 whatever the forward's precision
    labels, logits = labels[idx].to(out.device), logits[idx].to(out.device)
    hard = t.objective == "hard"
    if t.bins is not None:  # a regression target learned over score bins (CMOW paper IV-B)
        return binned_regression_loss(out, None if hard else logits, labels, ScoreBins(*t.bins),
                                      alpha=spec.alpha, hard_weight=hard_weight)
    return distillation_loss(t.objective, kind=t.kind, student=out,
                             teacher_logits=None if hard else logits, labels=labels,
                             temperature=spec.temperature, alpha=spec.alpha,
                             aggregation=t.aggregation, wrong_teacher_weight=t.wrong_teacher_weight,
                             hard_weight=hard_weight)


def average_gradients(params, world: int, weight: float = 1.0) -> None:
    """Average the gradients of `params` across workers, each worker's counting by its batch size.

    Plain DDP would need every step to go through its forward; here a step runs one task's branch on
    cached trunk states, so the averaging is done explicitly. All workers follow the same schedule,
    so they reduce the same parameters in the same order. Each worker's gradient (of its batch's
    mean loss) counts by its batch size `weight`, so the result is the gradient of the global batch's
    mean loss; a worker with an empty batch contributes zeros and weight 0.

    Dense gradients go through one all-reduce of a flat buffer. Sparse-gradient embedding tables
    (kdlib.optim.sparse_embeddings) are gathered as (rows, values) pairs and summed: the rows in the
    workers' batches travel, not the whole vocabulary-sized table.
    """
    if world == 1 or not params:
        return
    dense = [p for p in params if not _sparse_table(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    # the weight travels last (so a student whose shared parameters are all sparse tables, CMOW, still reduces it)
    flat = torch.cat([g.reshape(-1) * weight for g in grads] + [torch.tensor([float(weight)], device=params[0].device)])
    dist.all_reduce(flat)
    total = float(flat[-1])
    if total > 0:
        flat /= total
    offset = 0
    for p, g in zip(dense, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    tables = [p for p in params if _sparse_table(p)]
    if not tables:
        return
    # NCCL cannot all-reduce sparse tensors, and the workers' rows differ in number: the (rows, values) pairs
    # travel as pickled CPU tensors (all_gather_object, on gloo and NCCL alike) and land on the device again.
    coalesced = [None if p.grad is None else p.grad.coalesce() for p in tables]
    local = [None if g is None else (g.indices().cpu(), (g.values() * weight).cpu()) for g in coalesced]
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    for i, p in enumerate(tables):
        parts = [g[i] for g in gathered if g[i] is not None]
        if not parts or total <= 0:
            p.grad = None
            continue
        rows = torch.cat([r for r, _ in parts], dim=1).to(p.device)
        values = (torch.cat([v for _, v in parts]) / total).to(p.device)
        p.grad = torch.sparse_coo_tensor(rows, values, p.shape).coalesce()


def _sparse_table(p: torch.nn.Parameter) -> bool:
    return getattr(p, "_kdlib_sparse", False)


def run_distillation(*, datasets: dict[str, ray.data.Dataset], spec: TrainSpec, num_workers: int,
                     cpus_per_worker: float, max_failures: int, storage_path: str, name: str,
                     init_weights: Checkpoint | None = None, dev: dict[str, DevRows] | None = None,
                     gpus_per_worker: float = 0.0, backend: str = "auto", log=print):
    """Run the TorchTrainer; returns Ray Train's Result (its checkpoint holds the trained branches, its
    `return_value` every epoch's `history_row`).

    datasets: soft-target rows of any tasks, split across the workers without dropping a row
    (kdlib.worker_shares): one per task when read from the store, recut here into one block per worker,
    so every worker gets an equal share of each task (to one row); one stream when labeling feeds
    training directly. storage_path: a storage location (local path or URI) for its checkpoints; a rerun
    with the same one resumes from its last checkpoint. dev: each task's dev rows, scored after every epoch
    (`dev/<task>` in the metrics); None: not scored. gpus_per_worker: > 0 gives every worker that share of a
    GPU (Ray Train's use_gpu); the workers then train on it. backend: the workers' process group, "auto"
    being NCCL with GPUs and gloo without. log: where each epoch's line goes.
    """
    datasets = {name: in_worker_blocks(ds, num_workers) if isinstance(ds, MaterializedDataset) else ds
                for name, ds in datasets.items()}
    fs, path = storage.filesystem(storage_path)
    return fit(lambda callbacks: TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": WorkerJob(spec, sorted(datasets), init_weights, dev or {})},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
        torch_config=TorchConfig(backend=("nccl" if gpus_per_worker > 0 else "gloo") if backend == "auto" else backend),
        run_config=RunConfig(name=name, storage_path=path,
                             storage_filesystem=None if storage.is_local(storage_path) else fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets=datasets,
        dataset_config=LosslessSplit(),
    ), name=name, epochs=spec.epochs, log=log)


def load_trained_student(result_checkpoint: Checkpoint, spec: TrainSpec):
    """Rebuild the student on the driver and load the trained weights from Ray Train's final checkpoint."""
    trainee = make_trainee(spec)
    with result_checkpoint.as_directory() as d:
        load_weights(d, trainee.model)
    return trainee.model.eval()
