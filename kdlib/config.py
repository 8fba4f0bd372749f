"""The typed run configuration: the YAML files in configs/ validate into `RunConfig`.

The schema is the single source of defaults; library code takes plain arguments, and only jobs/ reads
this object. Load a file with `load_run_config(path, overrides)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdlib.config_loading import load_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncoderConfig(_Strict):
    """The pretrained encoder that teachers fine-tune and students are cut from."""

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    path: str | None = None  # local model folder; None resolves `name` (offline packages, then the hub)
    random_init: bool = False  # True: random weights from the config (+ config_overrides), for tests
    config_overrides: dict[str, int | float | str] = Field(default_factory=dict)
    max_length: int = Field(128, ge=8, le=512)
    pooling: Literal["mean", "cls"] = "mean"


class TaskConfig(_Strict):
    """One task: where its data is, which columns hold what, and its depths in the branched model."""

    kind: Literal["classification", "regression"]
    format: Literal["tsv", "csv", "jsonl", "parquet", "hub", "demo"]
    train: str  # file relative to data_dir (or absolute), hub dataset name, or demo task name
    dev: str
    hub_config: str | None = None
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # declared label set (classification); None: sorted values seen in train
    metric: Literal["accuracy", "f1", "matthews", "pearson", "spearman"] | None = None  # None: kind's default
    max_train_examples: int | None = Field(None, gt=0)  # first N rows of train (quick benchmarks)
    fine_tune_layers: int = Field(2, ge=1)  # L: teacher trains the top L encoder layers
    branch_layers: int = Field(1, ge=1)  # l: student branch layers, initialised from the teacher's

    @model_validator(mode="after")
    def _metric_fits_kind(self) -> "TaskConfig":
        cls_metrics, reg_metrics = {"accuracy", "f1", "matthews"}, {"pearson", "spearman"}
        allowed = cls_metrics if self.kind == "classification" else reg_metrics
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} does not fit kind {self.kind!r}; allowed: {sorted(allowed)}")
        if self.branch_layers > self.fine_tune_layers:
            raise ValueError(f"branch_layers ({self.branch_layers}) must not exceed fine_tune_layers "
                             f"({self.fine_tune_layers}): the branch is cut from the teacher's fine-tuned layers")
        return self


class TeacherConfig(_Strict):
    """Partial fine-tuning of each task's K-member ensemble (flexible-multitask-bert-serving, sec. 3.1)."""

    members: int = Field(2, ge=1)  # K seeds per task
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)  # encoder layers
    head_lr: float = Field(1e-3, gt=0)  # the freshly initialised head learns faster
    weight_decay: float = Field(0.01, ge=0)
    cpus_per_task: float = Field(1.0, gt=0)  # one Ray task per task trains its K members


class LabelingConfig(_Strict):
    """Teacher ensembles in a Ray Data actor pool writing every member's logits to Parquet."""

    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.8, gt=0)  # < 1 leaves room for Ray Data's read tasks on small machines
    torch_threads: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)


class DistillConfig(_Strict):
    """Multi-task student training on Ray Train: KL with temperature against the ensemble + hard loss."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.9, gt=0)
    torch_threads: int = Field(1, ge=1)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KD term; 1 - alpha on the hard-label loss
    ensemble: Literal["mean_logits", "mean_probs"] = "mean_logits"
    max_failures: int = Field(2, ge=0)


class RayConfig(_Strict):
    address: str | None = None  # None: join the cluster a `ray job submit` driver runs in, else start one
    num_cpus: int | None = Field(None, ge=1)  # only for a locally started Ray


class RunConfig(_Strict):
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_root: str = "runs"  # runs/, cached stages and artifacts live under it
    data_dir: str | None = None  # relative task paths are read from here
    seed: int = 0
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: dict[str, TaskConfig]
    teachers: TeacherConfig = Field(default_factory=TeacherConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        for name in self.tasks:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"task name {name!r}: use letters, digits, '-' and '_' only")
        needs_dir = [n for n, t in self.tasks.items() if t.format in ("tsv", "csv", "jsonl", "parquet")
                     and not (Path(t.train).is_absolute() and Path(t.dev).is_absolute())]
        if needs_dir and self.data_dir is None:
            raise ValueError(f"data_dir is not set but tasks {needs_dir} read relative paths; "
                             "set data_dir in the config or as data_dir=PATH on the command line")
        return self

    def task_path(self, task: str, split: Literal["train", "dev"]) -> str:
        """Where a task split's data is: data_dir joined for file formats, as given otherwise."""
        t = self.tasks[task]
        raw = getattr(t, split)
        if t.format in ("hub", "demo") or Path(raw).is_absolute():
            return raw
        return str(Path(self.data_dir).expanduser() / raw)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Validate a YAML file plus `key=value` overrides into a RunConfig (errors name file, line and key)."""
    return load_config(RunConfig, path, list(overrides))
