"""Text (and optional text pair) -> BERT input arrays."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _missing(p) -> bool:
    return p is None or (isinstance(p, float) and math.isnan(p)) or p is pd.NA


def text_pairs(pairs) -> list[str] | None:
    """A batch's second texts, or None when it has none.

    Missing entries may be None or, in pandas string columns (pandas 3 reads Parquet strings so), NaN:
    a batch with every entry missing has no pairs; one mixing both raises.
    """
    if pairs is None:
        return None
    missing = [_missing(p) for p in pairs]
    if all(missing):
        return None
    if any(missing):
        raise ValueError("a batch mixes rows with and without text_pair")
    return [str(p) for p in pairs]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts, pairs=None, *, max_length: int,
             pad_to_max: bool = False) -> dict[str, np.ndarray]:
    """Tokenize a batch.

    Args:
        texts: N strings. pairs: N strings, or None / N missing values (None or NaN) for no pairs.
        max_length: truncation length (pairs are truncated longest-first).
        pad_to_max: pad every row to max_length (fixed shapes for Ray Data columns); else to the longest.
    Returns:
        {"input_ids", "attention_mask", "token_type_ids"}: int64 arrays of shape (N, T).
    """
    texts = [str(t) for t in texts]
    pairs = text_pairs(pairs)
    enc = tokenizer(texts, pairs, truncation=True,
                    max_length=max_length, padding="max_length" if pad_to_max else "longest",
                    return_token_type_ids=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_KEYS}


def length_sorted_batches(tokenizer: PreTrainedTokenizerBase, texts, pairs=None, *, max_length: int,
                          batch_size: int, batch_tokens: int | None = None):
    """Tokenize once, then yield (row indices, inputs) for batches of similar length, right-padded.

    Each batch equals `tokenize` of its rows (padding to the longest), without tokenizing twice to sort.
    batch_tokens: a batch also stops before its padded size (rows x longest) would pass this budget, so
    short sentences go in large batches and long ones in small ones (at least one row each); None: rows only.
    Yields:
        (idx, {"input_ids", "attention_mask", "token_type_ids"}): idx an int array of row positions,
        the arrays int64 of shape (len(idx), T).
    """
    texts = [str(t) for t in texts]
    enc = tokenizer(texts, text_pairs(pairs), truncation=True, max_length=max_length, return_token_type_ids=True)
    rows = [{"input_ids": ids, "token_type_ids": types} for ids, types in zip(enc["input_ids"], enc["token_type_ids"])]
    lengths = np.array([len(r["input_ids"]) for r in rows])
    order = np.argsort(lengths, kind="stable")
    for idx in _cut(order, lengths, batch_size, batch_tokens):
        batch = tokenizer.pad([rows[i] for i in idx], padding="longest", return_attention_mask=True, return_tensors="np")
        yield idx, {k: batch[k].astype(np.int64) for k in INPUT_KEYS}


def _cut(order: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None):
    """Consecutive runs of `order` (ascending lengths) of at most batch_size rows and batch_tokens padded tokens."""
    start = 0
    while start < len(order):
        end = min(start + batch_size, len(order))
        if batch_tokens is not None:  # lengths ascend: a run's padded size is its count x its last length
            fits = np.nonzero(np.arange(1, end - start + 1) * lengths[order[start:end]] <= batch_tokens)[0]
            end = start + (int(fits[-1]) + 1 if len(fits) else 1)
        yield order[start:end]
        start = end
