"""Teacher labeling: Ray Data actors host a task's ensemble and write every member's logits to Parquet.

Each actor loads the encoder and the ensemble once (`__init__`), then for each batch runs the shared
frozen trunk once and every member's branch on top of it (`__call__`). Output rows are the input
example plus `teacher_logits`: a K x C nested list (K members, C classes; C = 1 for regression), so
the ensemble's aggregation can change later without relabeling.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
import torch

from kdlib.artifact import load_model
from kdlib.encoder import load_encoder, load_tokenizer
from kdlib.readers import EXAMPLE_COLUMNS as READER_COLUMNS
from kdlib.tokenize import tokenize

# The readers' example columns plus the split the row belongs to (kdlib.tasks adds it).
EXAMPLE_COLUMNS = [*READER_COLUMNS[:2], "split", *READER_COLUMNS[2:]]


class EnsembleLabeler:
    """Stateful Ray Data UDF: a task's teacher ensemble on one shared trunk."""

    def __init__(self, *, ensemble_dir: str, encoder_source: str, random_init: bool, config_overrides: dict,
                 seed: int, max_length: int, torch_threads: int):
        torch.set_num_threads(torch_threads)
        encoder = load_encoder(encoder_source, random_init, config_overrides, seed=seed)
        self.model, manifest = load_model(ensemble_dir, encoder=encoder)
        self.names = [b["name"] for b in manifest["branches"]]
        self.tokenizer = load_tokenizer(encoder_source)
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = batch["text_pair"]
        enc = tokenize(self.tokenizer, batch["text"], None if pairs[0] is None else pairs, max_length=self.max_length)
        enc = {k: torch.from_numpy(v) for k, v in enc.items()}
        out = self.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], names=self.names)
        logits = torch.stack([out[n] for n in self.names], dim=1).numpy()  # (B, K, C)
        nested = np.empty(len(logits), dtype=object)
        nested[:] = [row.tolist() for row in logits]
        return {**batch, "teacher_logits": nested}


def label_examples(examples: pd.DataFrame, *, ensemble_dir: str, out_dir: str, encoder_source: str,
                   random_init: bool, config_overrides: dict, seed: int, max_length: int, num_actors: int,
                   cpus_per_actor: float, torch_threads: int, batch_size: int) -> int:
    """Label every example with every ensemble member's logits; Parquet files land in `out_dir`.

    Returns the number of rows written, after checking that each input id appears exactly once.
    """
    examples = examples[EXAMPLE_COLUMNS]
    # Several blocks, so that every actor of the pool gets work.
    n_blocks = max(num_actors * 2, math.ceil(len(examples) / (batch_size * 4)))
    parts = split_frame(examples, n_blocks)
    ds = ray.data.from_pandas(parts)
    ds = ds.map_batches(
        EnsembleLabeler,
        fn_constructor_kwargs=dict(ensemble_dir=ensemble_dir, encoder_source=encoder_source,
                                   random_init=random_init, config_overrides=config_overrides, seed=seed,
                                   max_length=max_length, torch_threads=torch_threads),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
    ds.write_parquet(out_dir)
    written = read_labels(out_dir, columns=["id"])["id"]
    expected = set(examples["id"])
    if len(written) != len(expected) or set(written) != expected:
        raise RuntimeError(f"labeling wrote {len(written)} rows for {len(expected)} examples "
                           f"({len(set(written) - expected)} unexpected, {len(expected - set(written))} missing)")
    return len(written)


def split_frame(frame: pd.DataFrame, n_blocks: int) -> list[pd.DataFrame]:
    """Cut a DataFrame into up to n_blocks contiguous, non-empty pieces (Ray Data blocks)."""
    size = max(1, math.ceil(len(frame) / max(1, n_blocks)))
    return [frame.iloc[s:s + size] for s in range(0, len(frame), size)]


def read_labels(folder: str, columns: list[str] | None = None, split: str | None = None) -> pd.DataFrame:
    """Read a labels folder back (optionally one split), in id order within each split as written."""
    table = pq.read_table(str(Path(folder)), columns=columns)
    df = table.to_pandas()
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
    return df


def teacher_logits_array(df: pd.DataFrame) -> np.ndarray:
    """The nested `teacher_logits` column as a float32 array of shape (N, K, C)."""
    return np.asarray([np.asarray([np.asarray(m, dtype=np.float32) for m in row]) for row in df["teacher_logits"]],
                      dtype=np.float32)
