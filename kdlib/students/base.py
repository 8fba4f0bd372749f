"""The multi-task contract every student keeps: one shared encoder, one head per task (MKD sec. 4)."""

from __future__ import annotations

import torch
from torch import nn

from kdlib.students.heads import TaskHead, build_heads
from kdlib.students.inputs import StudentInputs


class MultiTaskStudent(nn.Module):
    """Base of the students: `encode` runs the shared network once, `task_features` picks (or combines)
    what one task's head reads, `self.heads[task]` maps it to (B, C).

    Subclasses set `self.encoder` (the shared network, for parameter accounting and hooks), implement
    `encode` and `task_features`, and call `_build_heads` with each task's feature width.
    """

    def __init__(self, tasks: dict[str, TaskHead]):
        super().__init__()
        if not tasks:
            raise ValueError("a student needs at least one task")
        self.tasks = dict(tasks)

    @property
    def vocab_size(self) -> int:
        """Rows of the encoder's (first) token table: the WordPiece vocabulary it reads."""
        return next(m for m in self.encoder.modules() if isinstance(m, nn.Embedding)).num_embeddings

    def _build_heads(self, in_dims: dict[str, int], hidden: int, dropout: float) -> None:
        self.heads = build_heads(self.tasks, in_dims, hidden, dropout)

    def encode(self, inputs: StudentInputs):
        raise NotImplementedError

    def task_features(self, encoded, task: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: StudentInputs, task: str) -> torch.Tensor:
        """(B, C) logits (classification) or (B, 1) predictions (regression) of one task."""
        return self.forward_tasks(inputs, [task])[task]

    def forward_tasks(self, inputs: StudentInputs, tasks: list[str]) -> dict[str, torch.Tensor]:
        """Encode once, then run only the requested tasks' heads: {task: (B, C)}."""
        self.check_inputs(inputs, tasks)
        encoded = self.encode(inputs)
        return {t: self.heads[t](self.task_features(encoded, t)) for t in tasks}

    def check_inputs(self, inputs: StudentInputs, tasks: list[str]) -> None:
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; known: {sorted(self.tasks)}")
        for t in tasks:
            if self.tasks[t].pair != inputs.has_pair:
                raise ValueError(f"task {t!r} is a {'pair' if self.tasks[t].pair else 'single-sentence'} task "
                                 f"but the batch {'has' if inputs.has_pair else 'has no'} second sequence")
