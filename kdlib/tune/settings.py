"""What a depth-search trial receives: one typed object per task, built once on the driver.

Ray Tune ships it to every trial of the task once (`tune.with_parameters`); the preparation and finishing
Ray tasks (kdlib.tune.search) receive the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from kdlib.config import TeacherConfig
from kdlib.encoder import EncoderRef
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.teachers import RESOURCE_FIELDS
from kdlib.tune.config import TrialStudentConfig
from kdlib.tune.search import scored_epochs


@dataclass(frozen=True)
class TrialSettings:
    data: TaskData  # the task's validated train and dev examples
    encoder: EncoderRef
    teachers: TeacherConfig  # how a (task, L) ensemble trains (kdlib.pipeline.teachers)
    student: TrialStudentConfig  # the trial's single-task distillation settings
    aggregation: str  # how the K teachers' logits become one target
    wrong_teacher_weight: float
    storage_root: str  # shared caches live under <storage_root>/cache/
    run_dir: str  # the search's output folder (students of cache-less trials)
    caches: bool
    scored_epochs: tuple[int, ...]  # the epochs a trial scores dev at (ASHA's rungs) besides its last
    inject_failures: tuple[str, ...] = ()  # "task:L:l" trials that raise (fault tests)
    torch_threads: int = 1
    precision: str = "fp32"  # the run's precision (kdlib.device): teachers and students train under its autocast

    @classmethod
    def from_config(cls, cfg, data: TaskData, encoder: EncoderRef, root: str, run_dir: str) -> "TrialSettings":
        """From a validated depth-search config (kdlib.tune.config.TuneRunConfig)."""
        t, s = cfg.tasks[data.name], cfg.search
        return cls(data=data, encoder=encoder, teachers=cfg.teachers, student=cfg.student,
                   aggregation=t.resolved_aggregation, wrong_teacher_weight=t.wrong_teacher_weight,
                   storage_root=root, run_dir=run_dir, caches=s.caches,
                   scored_epochs=tuple(scored_epochs(cfg.student.epochs, cfg.scheduler.grace_period,
                                                     cfg.scheduler.reduction_factor)),
                   inject_failures=tuple(s.inject_failures), torch_threads=s.torch_threads, precision=cfg.precision)

    @property
    def task(self) -> str:
        return self.data.name

    @property
    def seed(self) -> int:
        return self.encoder.seed

    def split(self, name: str) -> pd.DataFrame:
        """The train or dev examples."""
        return {"train": self.data.train, "dev": self.data.dev}[name]

    def key(self) -> dict:
        """What a sweep's results depend on (its resume key): everything but the data frames themselves
        (their digest stands for them) and how the trials are run."""
        return {"task": self.task, "kind": self.data.kind, "metric": self.data.metric,
                "label_names": self.data.label_names, "digest": self.data.digest,
                "encoder": self.encoder.model_dump(exclude={"seed"}),
                "teachers": self.teachers.model_dump(exclude=RESOURCE_FIELDS), "student": self.student.model_dump(),
                "aggregation": self.aggregation, "wrong_teacher_weight": self.wrong_teacher_weight, "seed": self.seed,
                "storage_root": self.storage_root, "caches": self.caches, "scored_epochs": list(self.scored_epochs),
                **({} if self.precision == "fp32" else {"precision": self.precision})}
