"""The typed config of a depth search (`jobs/tune_depth.py`); YAML files live in configs/tune/.

`TuneRunConfig` extends kdlib.config's `BaseRunConfig` (run name, storage, data, seed, encoder, tasks,
teachers, Ray), so a task block reads the same in both jobs, and a teacher trained by the search is the
very artifact `jobs/distill.py` would train (same stage fingerprint). A task's `fine_tune_layers` /
`branch_layers` are ignored here: the search picks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kdlib.config import BaseRunConfig, RunName, StrictModel
from kdlib.config_loading import load_config


class SearchConfig(StrictModel):
    """What Ray Tune searches, per task, and how many trials it runs at once."""

    min_fine_tune_layers: int = Field(2, ge=1)  # N_min: the paper keeps a minimum of sharing this way
    max_fine_tune_layers: int = Field(4, ge=1)  # N_max: at most the encoder's depth
    max_branch_layers: int = Field(3, ge=1, le=3)  # l_max: the student branch keeps 1..l_max layers
    num_samples: int = Field(8, ge=1)  # trials per task (duplicates suggested by Optuna hit the cache)
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # > 0: each trial trains on a GPU (fractions share one)
    torch_threads: int = Field(1, ge=1)  # per trial
    sampler: Literal["tpe", "brute_force"] = "tpe"  # brute_force: every (L, l) once, in Optuna's order
    include_teacher: bool = True  # also offer each teacher's best member as an undistilled branch (l = L)
    caches: bool = True  # false: every trial computes its own trunk states and trains its own teacher
    max_failures: int = Field(0, ge=0)  # retries of a failing trial before it is reported as failed
    inject_failures: list[str] = Field(default_factory=list)  # "task:L:l" trials that raise (fault tests)


class TrialStudentConfig(StrictModel):
    """The YAML's `student`: one trial's single-task distillation on cached trunk states (sec. 3.2; Hinton KD)."""

    epochs: int = Field(4, ge=1)  # ASHA's max_t; dev is scored at its rungs and the last epoch
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the KD term; the rest is the hard-label loss


class SchedulerConfig(StrictModel):
    """ASHA early stopping over student epochs (metric: the task's primary dev score)."""

    grace_period: int = Field(2, ge=1)  # epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # keep the top 1/reduction_factor at each rung


class SelectionConfig(StrictModel):
    """How the merged model's (L, l) per task are chosen; both rules are always computed and reported."""

    rule: Literal["threshold", "budget"] = "threshold"  # which rule builds the merged model
    threshold: float = Field(1.0, ge=0)  # c: a branch grows only while each extra layer gains >= c points
    budget: int | None = Field(None, ge=1)  # B: total layers of the merged model; None: tasks x encoder layers
    sweep_thresholds: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0])  # curve points
    sweep_budgets: list[int] = Field(default_factory=list)  # curve points; empty: every feasible budget


class ReferenceConfig(StrictModel):
    full_fine_tuning: bool = True  # train one L = N member per task: the 100%-overhead reference


class TuneRunConfig(BaseRunConfig):
    """A depth search: the shared fields plus what Ray Tune searches, each trial's student, ASHA, the selection."""

    run_name: RunName = "tune_demo"  # results in <storage_root>/<run_name>/tune/, caches in <storage_root>/cache/
    search: SearchConfig = Field(default_factory=SearchConfig)
    student: TrialStudentConfig = Field(default_factory=TrialStudentConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)

    @model_validator(mode="after")
    def _check(self) -> "TuneRunConfig":
        s = self.search
        if s.min_fine_tune_layers > s.max_fine_tune_layers:
            raise ValueError(f"search.min_fine_tune_layers ({s.min_fine_tune_layers}) exceeds "
                             f"search.max_fine_tune_layers ({s.max_fine_tune_layers})")
        for name, t in self.tasks.items():
            if t.augment.copies or t.unlabeled is not None:
                raise ValueError(f"tasks.{name}: augment and unlabeled are not used by the depth search; remove them")
            if t.teacher_checkpoints is not None:
                raise ValueError(f"tasks.{name}: the depth search trains its own teachers for every L it tries, so "
                                 "teacher_checkpoints do not apply; distil from them with jobs/distill.py")
        if self.scheduler.grace_period > self.student.epochs:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds student.epochs "
                             f"({self.student.epochs})")
        return self


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> TuneRunConfig:
    """Validate a YAML file plus `key=value` overrides (errors name file, line and key)."""
    return load_config(TuneRunConfig, path, list(overrides))


def check_feasible(cfg: TuneRunConfig, encoder_layers: int) -> None:
    """Settings that cannot work with this encoder fail before anything runs (ConfigError naming the key)."""
    from kdlib.errors import ConfigError

    s, n_tasks = cfg.search, len(cfg.tasks)
    if s.max_fine_tune_layers > encoder_layers:
        raise ConfigError(f"search.max_fine_tune_layers={s.max_fine_tune_layers}: the encoder has only "
                          f"{encoder_layers} layers (N_max must be at most {encoder_layers})")
    if s.max_branch_layers > s.max_fine_tune_layers:
        raise ConfigError(f"search.max_branch_layers={s.max_branch_layers} exceeds search.max_fine_tune_layers="
                          f"{s.max_fine_tune_layers}: a branch is cut from the teacher's fine-tuned layers")
    smallest = (encoder_layers - s.max_fine_tune_layers) + n_tasks  # shallowest trunk, one layer per task
    budgets = ([cfg.selection.budget] if cfg.selection.budget is not None else []) + list(cfg.selection.sweep_budgets)
    for b in budgets:
        if b < n_tasks:
            raise ConfigError(f"selection budget {b} is below one layer per task ({n_tasks} tasks need at least "
                              f"{n_tasks} branch layers, plus a trunk of {encoder_layers - s.max_fine_tune_layers})")
        if b < smallest:
            raise ConfigError(f"selection budget {b} cannot hold the smallest merged model: a trunk of "
                              f"{encoder_layers - s.max_fine_tune_layers} layers (N - N_max) + {n_tasks} one-layer "
                              f"branches = {smallest} layers")
