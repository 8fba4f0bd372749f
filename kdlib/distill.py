"""Multi-task student distillation on Ray Train (TorchTrainer, CPU, gloo).

Every task's soft-target rows are a Ray Dataset, split evenly across workers. Each worker builds the
student (frozen shared trunk, one branch per task initialised from the teacher), and every step trains
one task's batch: the schedule (MT-DNN Algorithm 1: all tasks' mini-batches merged and shuffled each
epoch) is drawn from a seed shared by all workers, so every replica updates the same branch in the
same step. The frozen trunk's states are computed once per worker and reused by every epoch. Loss: KL with temperature against the ensemble plus the hard-label loss (losses.py).
A checkpoint is written every epoch; a restarted worker group resumes from the last one.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.extensions import TensorArray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kdlib.artifact import load_model
from kdlib.labeling import split_frame
from kdlib.encoder import load_encoder
from kdlib.losses import ensemble_target, kd_classification_loss, kd_regression_loss
from kdlib.merge import build_student
from kdlib.features import TrunkFeatures, length_grouped_batches
from kdlib.tokenize import INPUT_KEYS, tokenize
from kdlib.train_state import load_train_state, save_train_state


def soft_target_dataset(rows: pd.DataFrame, tokenizer, *, kind: str, max_length: int,
                        n_blocks: int = 8) -> ray.data.Dataset:
    """Labeled rows (text, text_pair, label, teacher_logits) -> a Ray Dataset of fixed-shape tensors.

    Columns: input_ids, attention_mask, token_type_ids (N, max_length) int64; label (N,) float32,
    NaN where there is no gold label (classification ids are stored as floats and cast back);
    teacher_logits (N, K, C) float32.
    """
    pairs = rows["text_pair"].tolist()
    enc = tokenize(tokenizer, rows["text"].tolist(), None if pairs[0] is None else pairs,
                   max_length=max_length, pad_to_max=True)
    logits = np.asarray([np.stack([np.asarray(m, np.float32) for m in r]) for r in rows["teacher_logits"]])
    label = pd.to_numeric(rows["label"], errors="coerce").to_numpy(np.float32)
    frame = pd.DataFrame({**{k: TensorArray(v) for k, v in enc.items()},
                          "label": label, "teacher_logits": TensorArray(logits)})
    parts = split_frame(frame, n_blocks)
    return ray.data.from_pandas(parts)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build the student, load this worker's shards, train with per-epoch checkpoints."""
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tasks: dict = config["tasks"]

    encoder = load_encoder(config["encoder_source"], config["random_init"], config["config_overrides"],
                           seed=config["seed"])
    teachers = {}
    for task, t in tasks.items():
        model, _ = load_model(t["ensemble_dir"], encoder=encoder)
        teachers[task] = (model, t["init_member"])
    student = build_student(encoder, teachers, {t: v["branch_layers"] for t, v in tasks.items()},
                            config["pooling"])
    del teachers

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config["lr"], weight_decay=config["weight_decay"])
    start_epoch, step, starts = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = load_train_state(d, student, optimizer)
        start_epoch, step, starts = meta["epoch"], meta["step"], meta["starts"]
        if rank == 0:
            print(f"[distill] resuming from checkpoint after epoch {start_epoch} (step {step})", flush=True)
    starts = starts + [start_epoch]  # the epoch each attempt started from: [0, 2] = resumed after epoch 2
    # This worker's rows of every task, materialised once (token ids and K x C logits per row), and
    # their frozen trunk states computed once: only the branches train, so the trunk never changes.
    data, feats = {}, {}
    for task in tasks:
        batches = list(ray.train.get_dataset_shard(task).iter_torch_batches(batch_size=4096))
        data[task] = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        feats[task] = TrunkFeatures.from_inputs(student, {k: data[task][k] for k in INPUT_KEYS},
                                                depth=student.specs[task].depth)
    # Every worker must run the same number of steps per task; even splits make this hold, check it.
    counts = torch.tensor([len(data[t]["label"]) for t in tasks], dtype=torch.long)
    if world > 1:
        lowest = counts.clone()
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        counts = lowest
    bs = config["batch_size"]

    for epoch in range(start_epoch, config["epochs"]):
        epoch_start = time.perf_counter()
        shared = np.random.default_rng([config["seed"], epoch])  # same on every worker
        local = np.random.default_rng([config["seed"], epoch, rank])
        batches = {t: length_grouped_batches(feats[t].lengths[: int(n)], bs, local) for t, n in zip(tasks, counts)}
        schedule = [t for t in tasks for _ in batches[t]]
        shared.shuffle(schedule)
        losses: dict[str, list[float]] = {t: [] for t in tasks}
        student.train()
        for i, task in enumerate(schedule):
            idx = batches[task].pop()
            h, mask = feats[task].batch(idx)
            out = student.branch_forward(task, h, mask)
            target, labels = data[task]["teacher_logits"][idx], data[task]["label"][idx]
            if tasks[task]["kind"] == "classification":
                target = ensemble_target(target, config["ensemble"], config["temperature"])
                labels = torch.nan_to_num(labels, nan=-1).long()
                loss = kd_classification_loss(out, target, labels, config["temperature"], config["alpha"])
            else:
                loss = kd_regression_loss(out, target.mean(1), labels, config["alpha"])  # ensemble mean
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(student.branches[task].parameters(), world)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            step += 1
            losses[task].append(loss.item())
            if rank == 0 and (i + 1) % config["log_every"] == 0:
                print(f"[distill] epoch {epoch + 1}/{config['epochs']} step {i + 1}/{len(schedule)} "
                      f"{task} loss {loss.item():.4f}", flush=True)
        metrics = {"epoch": epoch + 1, "step": step, "start_epoch": start_epoch, "seconds": round(time.perf_counter() - epoch_start, 2),
                   **{f"loss/{t}": float(np.mean(v)) if v else float("nan") for t, v in losses.items()}}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_train_state(tmp, student, optimizer, {"epoch": epoch + 1, "step": step, "starts": starts})
                ckpt = Checkpoint.from_directory(tmp)
                print(f"[distill] epoch {epoch + 1} done in {metrics['seconds']}s: "
                      + ", ".join(f"{t} {metrics[f'loss/{t}']:.4f}" for t in tasks), flush=True)
            ray.train.report(metrics, checkpoint=ckpt)


def average_gradients(params, world: int) -> None:
    """All-reduce (mean) the gradients of `params` across workers in one flat buffer.

    Plain DDP would need every step to go through its forward; here a step runs one task's branch on
    cached trunk states, so the averaging is done explicitly. All workers follow the same schedule,
    so they reduce the same parameters in the same order.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def run_distillation(*, datasets: dict[str, ray.data.Dataset], loop_config: dict, num_workers: int,
                     cpus_per_worker: float, max_failures: int, storage_path: str, name: str):
    """Run the TorchTrainer; returns Ray Train's Result (its checkpoint holds the trained branches)."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    return trainer.fit()


def load_trained_student(result_checkpoint: Checkpoint, loop_config: dict):
    """Rebuild the student on the driver and load the trained weights from Ray Train's final checkpoint."""
    encoder = load_encoder(loop_config["encoder_source"], loop_config["random_init"],
                           loop_config["config_overrides"], seed=loop_config["seed"])
    teachers = {task: (load_model(t["ensemble_dir"], encoder=encoder)[0], t["init_member"])
                for task, t in loop_config["tasks"].items()}
    student = build_student(encoder, teachers, {t: v["branch_layers"] for t, v in loop_config["tasks"].items()},
                            loop_config["pooling"])
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
    with result_checkpoint.as_directory() as d:
        load_train_state(d, student, optimizer)
    return student.eval(), encoder
