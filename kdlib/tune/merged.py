"""The merged model of a selection: one frozen trunk, each task's chosen branch at its own depth (sec. 3.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdlib import storage
from kdlib.artifact import load_model, save_model
from kdlib.branched import BranchedModel
from kdlib.merge import merge, overhead
from kdlib.predict import predict
from kdlib.tune.selection import Candidate


def merge_choice(encoder, choice: dict[str, Candidate], pooling: str) -> tuple[BranchedModel, dict[str, BranchedModel]]:
    """(merged model, {task: its single-task model}) from the chosen candidates' artifacts."""
    singles = {t: load_model(storage.local_copy(c.path), encoder=encoder)[0] for t, c in choice.items()}
    return merge(encoder, list(singles.values()), pooling), singles


def max_output_difference(merged: BranchedModel, singles: dict[str, BranchedModel], tokenizer,
                          texts: dict[str, tuple[list[str], list[str] | None]], max_length: int) -> dict[str, float]:
    """Per task, the largest |merged - single-task| output on the given texts (should be float noise)."""
    diffs = {}
    for task, single in singles.items():
        t, p = texts[task]
        a = predict(merged, tokenizer, t, p, [task], max_length=max_length)[task]
        b = predict(single, tokenizer, t, p, [task], max_length=max_length)[task]
        diffs[task] = float(np.abs(a - b).max())
    return diffs


def save_merged(merged: BranchedModel, folder: Path, tasks: dict, extra: dict) -> Path:
    layout = [(s.depth, s.layers) for s in merged.specs.values()]
    return save_model(merged, folder, tasks=tasks,
                      extra={"role": "merged", "overhead": overhead(layout, merged.config.num_hidden_layers), **extra})
