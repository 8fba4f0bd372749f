"""Frozen trunk features: the bottom layers run once per example, then training touches only the top.

Partial fine-tuning freezes the embeddings and the bottom N - L layers, so their outputs never change
during training. Computing them once and reusing them for every epoch and every ensemble member is
what makes training K teachers cost about K x L/N of a full fine-tuning.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdlib.branched import BranchedModel
from kdlib.device import autocast, model_device
from kdlib.tokenize import tokenize


def length_grouped_batches(lengths, batch_size: int, rng: np.random.Generator, group: int = 32,
                           n_batches: int | None = None) -> list[np.ndarray]:
    """Shuffled mini-batches of similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside each group,
    batched, and the batches shuffled: random like plain shuffling across epochs, but tight padding.
    n_batches: return exactly this many batches (at least ceil(N / batch_size)): batches shrink to
    ceil(N / n_batches) rows and empty ones pad the list, so workers with unequal shares can follow
    one schedule.
    """
    if n_batches is not None:
        if n_batches * batch_size < len(lengths):
            raise ValueError(f"{len(lengths)} rows do not fit {n_batches} batches of {batch_size}")
        batch_size = max(1, math.ceil(len(lengths) / max(1, n_batches)))
        batches = length_grouped_batches(lengths, batch_size, rng, group) if len(lengths) else []
        batches += [np.zeros(0, dtype=np.int64)] * (n_batches - len(batches))
        rng.shuffle(batches)
        return batches
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    span = batch_size * group
    for s in range(0, len(order), span):
        chunk = order[s:s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class TrunkFeatures:
    """Per-example trunk states (unpadded) for one dataset, collated into padded batches on demand."""

    def __init__(self, states: list[torch.Tensor]):
        self.states = states  # N tensors of shape (T_i, H)

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def compute(cls, model: BranchedModel, tokenizer, texts, pairs, *, depth: int, max_length: int,
                batch_size: int = 64, precision: str = "fp32") -> "TrunkFeatures":
        """Trunk states at `depth` for texts (and pairs: all None or NaN for single-text tasks)."""
        enc = tokenize(tokenizer, texts, pairs, max_length=max_length)
        return cls.from_inputs(model, {k: torch.from_numpy(v) for k, v in enc.items()}, depth=depth,
                               batch_size=batch_size, precision=precision)

    @classmethod
    @torch.no_grad()
    def from_inputs(cls, model: BranchedModel, inputs: dict[str, torch.Tensor], *, depth: int,
                    batch_size: int = 64, precision: str = "fp32") -> "TrunkFeatures":
        """Run embeddings + `depth` trunk layers over (N, T) padded inputs, batching similar lengths together.

        The trunk runs where the model is (a GPU: batches go there and come back), under `precision`'s
        autocast; the states are kept in fp32 on the CPU, so they cost no device memory between epochs."""
        was_training = model.training
        model.eval()
        dev = model_device(model)
        lengths = inputs["attention_mask"].sum(1)
        order = torch.argsort(lengths, stable=True)
        states: list[torch.Tensor | None] = [None] * len(lengths)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t = int(lengths[idx].max())
            batch = {k: v[idx, :t].to(dev, non_blocking=True) for k, v in inputs.items()}
            with autocast(dev, precision):
                h = model.trunk_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], depth)
            h = h.float().cpu()
            for row, i in enumerate(idx.tolist()):
                states[i] = h[row, : int(lengths[i])].clone()  # (T_i, H)
        model.train(was_training)
        return cls(states)

    @property
    def lengths(self) -> list[int]:
        return [s.shape[0] for s in self.states]

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, T, H) states and their (B, T) attention mask for example indices `idx`."""
        rows = [self.states[i] for i in idx]
        t = max(r.shape[0] for r in rows)
        h = rows[0].new_zeros(len(rows), t, rows[0].shape[1])
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        for j, r in enumerate(rows):
            h[j, : r.shape[0]] = r
            mask[j, : r.shape[0]] = 1
        return h, mask
