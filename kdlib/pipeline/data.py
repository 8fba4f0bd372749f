"""The data stage: each task's validated train and dev examples, its label set and a digest of its content."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd

from kdlib.metrics import default_primary_metric
from kdlib.readers import read_split


@dataclass
class TaskData:
    name: str
    kind: str
    metric: str
    label_names: list[str]
    train: pd.DataFrame  # readers' example columns plus `split`
    dev: pd.DataFrame
    digest: str  # changes whenever an id, text or label changes

    @property
    def num_outputs(self) -> int:
        return len(self.label_names) if self.kind == "classification" else 1


def load_task(*, name: str, kind: str, format: str, train_path: str, dev_path: str, text_column: str | int,
              text_pair_column: str | int | None, label_column: str | int, labels: list[str] | None,
              metric: str | None, header: bool = True, hub_config: str | None = None,
              max_train_examples: int | None = None) -> TaskData:
    """Read and validate both splits; dev is read against train's label set so ids mean the same classes."""
    common = dict(task=name, format=format, text_column=text_column, text_pair_column=text_pair_column,
                  label_column=label_column, kind=kind, header=header, hub_config=hub_config)
    train, label_names = read_split(split="train", path=train_path, labels=labels, **common)
    dev, _ = read_split(split="dev", path=dev_path, labels=label_names if kind == "classification" else None,
                        **common)
    if max_train_examples is not None:
        train = train.iloc[:max_train_examples].reset_index(drop=True)
    train.insert(2, "split", "train")
    dev.insert(2, "split", "dev")
    h = hashlib.sha256()
    for frame in (train, dev):
        h.update(pd.util.hash_pandas_object(frame[["id", "text", "text_pair", "label"]].astype(str),
                                            index=False).to_numpy().tobytes())
    return TaskData(name, kind, metric or default_primary_metric(kind), label_names, train, dev, h.hexdigest()[:16])


def load_tasks(cfg) -> dict[str, TaskData]:
    """Every task a config declares (`RunConfig` or the depth search's `TuneRunConfig`), read and validated."""
    return {name: load_task(name=name, kind=t.kind, format=t.format, train_path=cfg.task_path(name, "train"),
                            dev_path=cfg.task_path(name, "dev"), text_column=t.text_column,
                            text_pair_column=t.text_pair_column, label_column=t.label_column, labels=t.labels,
                            metric=t.metric, header=t.header, hub_config=t.hub_config,
                            max_train_examples=t.max_train_examples)
            for name, t in cfg.tasks.items()}


def load_data(ctx) -> dict[str, TaskData]:
    """The data stage: every task of the run read, validated and digested (the digests key later stages)."""
    tasks = load_tasks(ctx.cfg)
    for name, t in tasks.items():
        ctx.log(f"[data:{name}] {t.kind}, {len(t.train)} train / {len(t.dev)} dev, labels {t.label_names or '-'}")
    return tasks
