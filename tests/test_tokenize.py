"""Tokenization of single texts and pairs, including pandas' missing values for 'no pair'."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdlib.tokenize import text_pairs, tokenize


def test_missing_pairs_from_a_parquet_string_column_mean_no_pair(tmp_path, tokenizer):
    # pandas 3 reads a Parquet string column of nulls back as NaN, not None: those rows have no pair.
    pd.DataFrame({"text": ["a good film", "bad"], "text_pair": [None, None]}).to_parquet(tmp_path / "x.parquet")
    frame = pd.read_parquet(tmp_path / "x.parquet")
    pairs = frame["text_pair"].tolist()
    assert text_pairs(pairs) is None
    got = tokenize(tokenizer, frame["text"].tolist(), pairs, max_length=16)
    want = tokenize(tokenizer, frame["text"].tolist(), None, max_length=16)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert (got["token_type_ids"] == 0).all()  # no second segment


def test_pairs_are_kept_and_a_mixed_batch_is_refused(tokenizer):
    enc = tokenize(tokenizer, ["a", "b"], ["c d", "e"], max_length=16)
    assert enc["token_type_ids"].sum() > 0
    with pytest.raises(ValueError, match="mixes rows with and without text_pair"):
        text_pairs(["c", float("nan")])
