"""Frozen trunk features: the bottom layers run once per example, then training touches only the top.

Partial fine-tuning freezes the embeddings and the bottom N - L layers, so their outputs never change
during training. Computing them once and reusing them for every epoch and every ensemble member is
what makes training K teachers cost about K x L/N of a full fine-tuning.
"""

from __future__ import annotations

import numpy as np
import torch

from kdlib.branched import BranchedModel
from kdlib.tokenize import tokenize


class TrunkFeatures:
    """Per-example trunk states (unpadded) for one dataset, collated into padded batches on demand."""

    def __init__(self, states: list[torch.Tensor]):
        self.states = states  # N tensors of shape (T_i, H)

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    @torch.no_grad()
    def compute(cls, model: BranchedModel, tokenizer, texts, pairs, *, depth: int, max_length: int,
                batch_size: int = 64) -> "TrunkFeatures":
        """Run embeddings + `depth` trunk layers over all examples, batching similar lengths together."""
        model.eval()
        lengths = [len(t) + (len(p) if p is not None else 0) for t, p in zip(texts, pairs)]
        order = np.argsort(lengths, kind="stable")
        states: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenize(tokenizer, [texts[i] for i in idx], [pairs[i] for i in idx] if pairs[0] is not None
                           else None, max_length=max_length)
            enc = {k: torch.from_numpy(v) for k, v in enc.items()}
            h = model.trunk_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], depth)
            for row, i in enumerate(idx):
                n = int(enc["attention_mask"][row].sum())
                states[i] = h[row, :n].clone()  # (T_i, H)
        return cls(states)

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
