"""Batched inference over texts: the branched model, and the end-to-end students."""

from __future__ import annotations

import numpy as np
import torch

from kdlib.branched import BranchedModel
from kdlib.students.inputs import make_student_inputs
from kdlib.tokenize import tokenize


@torch.no_grad()
def predict(model: BranchedModel, tokenizer, texts: list[str], pairs: list[str | None] | None,
            names: list[str], *, max_length: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Outputs of branches `names` for every text (the trunk runs once per batch for all of them).

    Returns:
        {name: (N, C) float32 array}.
    """
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for s in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[s:s + batch_size], None if pairs is None else pairs[s:s + batch_size],
                       max_length=max_length)
        enc = {k: torch.from_numpy(v) for k, v in enc.items()}
        out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], names=names)
        for n in names:
            chunks[n].append(out[n].float().numpy())
    return {n: np.concatenate(c) for n, c in chunks.items()}


@torch.no_grad()
def predict_student(model, tokenizer, texts: list[str], pairs: list[str | None] | None, names: list[str], *,
                    max_length: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Outputs of an end-to-end student (kdlib.students) for tasks `names`; it encodes each batch once.

    Returns:
        {name: (N, C) float32 array}.
    """
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for s in range(0, len(texts), batch_size):
        inputs = make_student_inputs(tokenizer, texts[s:s + batch_size],
                                     None if pairs is None else pairs[s:s + batch_size], max_length=max_length)
        out = model.forward_tasks(inputs, names)
        for n in names:
            chunks[n].append(model.tasks[n].scores(out[n]).float().numpy())  # binned heads: expected scores
    return {n: np.concatenate(c) for n, c in chunks.items()}
