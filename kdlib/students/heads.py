"""Task specs and task-specific heads shared by every student (MKD, sec. 4).

MKD sec. 4: the student network's parameters are shared by all tasks and "each task has its individual
layer on top of it": a fully connected layer with ReLU whose output goes through another linear layer to
give logits z = Wh. Sec. 6.2 sets that layer's output size to 512. A regression task is the same head with
one output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlib.students.binning import ScoreBins

TASK_KINDS = ("classification", "regression")


@dataclass(frozen=True)
class TaskHead:
    """What one task's head outputs and what input it reads.

    Attributes:
        kind: "classification" (logits over num_outputs classes) or "regression" (num_outputs == 1).
        num_outputs: classes, or 1 for regression, or one per bin for a binned regression head.
        pair: the task's examples are text pairs (a, b); False for single-sentence tasks.
        bins: (low, high, width): the regression target is learned as classes over these bins (CMOW paper
            sec. IV-B: STS-B in steps of 0.2) and predicted as the expected score (`scores`).
    """

    kind: str
    num_outputs: int
    pair: bool = False
    bins: tuple[float, float, float] | None = None  # regression as classes over (low, high, width) bins

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskHead.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.num_outputs < 1:
            raise ValueError(f"TaskHead.num_outputs must be >= 1, got {self.num_outputs}")
        if self.bins is not None:
            object.__setattr__(self, "bins", tuple(float(b) for b in self.bins))
            if self.kind != "regression" or self.num_outputs != self.score_bins.num_bins:
                raise ValueError(f"binned heads are regression heads with one output per bin "
                                 f"({self.score_bins.num_bins}), got {self.kind} with {self.num_outputs}")
        elif self.kind == "regression" and self.num_outputs != 1:
            raise ValueError(f"a regression head has 1 output, got {self.num_outputs}")

    @property
    def score_bins(self) -> ScoreBins | None:
        return None if self.bins is None else ScoreBins(*self.bins)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the task predicts from the head's outputs: (B, C) logits, or (B, 1) scores for regression
        (a binned head's expected score over its bins)."""
        if self.bins is None:
            return outputs
        return self.score_bins.expected_score(torch.softmax(outputs, dim=-1))[:, None]


class MLPHead(nn.Module):
    """Linear -> ReLU -> dropout -> linear (MKD sec. 4): (B, D) features -> (B, C) logits or predictions."""

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.relu(self.fc(x))))  # (B, C)


def build_heads(tasks: dict[str, TaskHead], in_dims: dict[str, int], hidden: int,
                dropout: float) -> nn.ModuleDict:
    """One `MLPHead` per task; `in_dims[task]` is the width of the features that task's head reads."""
    return nn.ModuleDict({name: MLPHead(in_dims[name], hidden, spec.num_outputs, dropout)
                          for name, spec in tasks.items()})
