"""The distillation loop's dev score per epoch: each task's primary metric on its dev rows.

The driver sends every task's dev examples with the WorkerJob (`DevRows`). Each worker turns its
contiguous share of them into the trainee's features once, at ingest (the branched student's frozen trunk
states, or an end-to-end student's token ids), so an epoch's score costs one forward of the branches (or of
the end-to-end student) over the worker's share. The training loop gathers the shares' outputs in rank
order and scores them on every rank alike: all ranks report the same numbers and stay in step.

Scoring runs in eval mode under no_grad: no dropout, so no draw from the torch RNG that training's dropout
uses, and no gradient. Training is the same with or without it (tests/test_stage_distill.py compares the
weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kdlib.metrics import task_metrics
from kdlib.train_spec import TaskSpec
from kdlib.trainees import task_heads

BATCH = 256  # dev rows per forward: no gradient is kept, so larger than a training batch


@dataclass(frozen=True)
class DevRows:
    """One task's dev examples as plain lists (they travel to every worker) and the metric that scores them."""

    texts: list[str]
    pairs: list  # the second text of each example; None (or NaN) for single-sentence tasks
    labels: list[float]  # class ids or regression targets
    metric: str  # the task's primary metric (kdlib.metrics.task_metrics)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, metric: str) -> "DevRows":
        """From a task's dev frame (readers' columns text, text_pair, label)."""
        return cls(frame["text"].tolist(), frame["text_pair"].tolist(),
                   pd.to_numeric(frame["label"]).astype("float64").tolist(), metric)


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n rows (numpy.array_split's cut: the first n % world shares
    hold one row more), so the shares concatenated in rank order are the rows in order."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def dev_features(dev: dict[str, DevRows], trainee, *, rank: int, world: int, max_length: int) -> dict:
    """Per task, this worker's share of the dev rows as the trainee's collated features."""
    out = {}
    for task, rows in dev.items():
        lo, hi = share_bounds(len(rows.texts), rank, world)
        items = trainee.features(task, rows.texts[lo:hi], rows.pairs[lo:hi], max_length) if hi > lo else []
        out[task] = trainee.collate(items)
    return out


@torch.no_grad()
def dev_outputs(trainee, tasks: dict[str, TaskSpec], features: dict) -> dict[str, np.ndarray]:
    """Per task, the trainee's predictions on this worker's dev share: (n, C) logits, or (n, 1) scores for
    regression (a binned head's expected score). Leaves the model in eval mode."""
    trainee.model.eval()
    heads = task_heads(tasks)
    out = {}
    for task, feats in features.items():
        n = len(feats)
        chunks = [heads[task].scores(trainee.forward(task, feats, np.arange(s, min(s + BATCH, n)))).float().cpu().numpy()
                  for s in range(0, n, BATCH)]
        width = tasks[task].num_outputs if tasks[task].kind == "classification" else 1
        out[task] = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
    return out


def dev_metrics(outputs: dict[str, np.ndarray], dev: dict[str, DevRows], tasks: dict[str, TaskSpec]) -> dict:
    """{"dev/<task>": primary metric} from every dev row's outputs (in the rows' order)."""
    return {f"dev/{task}": task_metrics(tasks[task].kind, out, np.asarray(dev[task].labels))[dev[task].metric]
            for task, out in outputs.items()}
