"""Text (and optional text pair) -> BERT input arrays."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(tokenizer: PreTrainedTokenizerBase, texts, pairs=None, *, max_length: int,
             pad_to_max: bool = False) -> dict[str, np.ndarray]:
    """Tokenize a batch.

    Args:
        texts: N strings. pairs: N strings or None (a None entry means no pair for that row).
        max_length: truncation length (pairs are truncated longest-first).
        pad_to_max: pad every row to max_length (fixed shapes for Ray Data columns); else to the longest.
    Returns:
        {"input_ids", "attention_mask", "token_type_ids"}: int64 arrays of shape (N, T).
    """
    texts = [str(t) for t in texts]
    has_pairs = pairs is not None and any(p is not None for p in pairs)
    if has_pairs and any(p is None for p in pairs):
        raise ValueError("a batch mixes rows with and without text_pair")
    enc = tokenizer(texts, [str(p) for p in pairs] if has_pairs else None, truncation=True,
                    max_length=max_length, padding="max_length" if pad_to_max else "longest",
                    return_token_type_ids=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_KEYS}
