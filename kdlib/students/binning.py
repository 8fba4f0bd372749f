"""Casting a regression target to classes over bins and back (CMOW paper, sec. IV-B).

The CMOW paper distils STS-B as classification "following Raffel et al. [T5]": the 0-5 similarity score is
cut into intervals of 0.2 (T5 rounds each score to the nearest 0.2, giving 26 classes). A predicted class
distribution maps back to a score as its expectation over the bin centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreBins:
    """Evenly spaced bin centres low, low + width, ..., high (STS-B defaults: 0 to 5 by 0.2 = 26 bins)."""

    low: float = 0.0
    high: float = 5.0
    width: float = 0.2

    def __post_init__(self):
        if self.width <= 0 or self.high <= self.low:
            raise ValueError(f"bins need low < high and width > 0, got {self}")
        steps = (self.high - self.low) / self.width
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(f"(high - low) / width must be a whole number of bins, got {steps}")

    @property
    def num_bins(self) -> int:
        return round((self.high - self.low) / self.width) + 1

    def centers(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.low + self.width * torch.arange(self.num_bins, dtype=dtype)  # (K,)

    def to_index(self, scores: torch.Tensor) -> torch.Tensor:
        """Nearest bin of each score (scores outside [low, high] clamp to the end bins): (N,) -> (N,) int64."""
        pos = (scores.to(torch.float64) - self.low) / self.width
        return torch.round(pos).clamp(0, self.num_bins - 1).long()

    def to_distribution(self, scores: torch.Tensor, soft: bool = False) -> torch.Tensor:
        """Scores -> class distributions over the bins: (N,) -> (N, K).

        soft=False: one-hot at the nearest bin (the paper's binning; the round trip is exact to within
        width / 2). soft=True: the score's mass split linearly between its two neighbouring centres, so
        `expected_score` returns the (clamped) score exactly.
        """
        k = self.num_bins
        if not soft:
            return torch.nn.functional.one_hot(self.to_index(scores), k).to(torch.get_default_dtype())
        pos = ((scores.to(torch.float64) - self.low) / self.width).clamp(0, k - 1)  # (N,)
        lo = pos.floor().long().clamp(max=k - 2)
        frac = pos - lo  # in [0, 1]
        dist = torch.zeros(scores.shape[0], k, dtype=torch.float64)
        dist.scatter_(1, lo[:, None], (1 - frac)[:, None])
        dist.scatter_add_(1, (lo + 1)[:, None], frac[:, None])
        return dist.to(torch.get_default_dtype())

    def expected_score(self, probs: torch.Tensor) -> torch.Tensor:
        """Class distributions (or softmaxed logits) -> expected scores: (N, K) -> (N,)."""
        if probs.shape[-1] != self.num_bins:
            raise ValueError(f"expected {self.num_bins} bins, got {probs.shape[-1]}")
        return probs @ self.centers(probs.dtype)
