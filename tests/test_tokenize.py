"""Tokenization of single texts and pairs, including pandas' missing values for 'no pair'."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdlib.tokenize import length_sorted_batches, text_pairs, tokenize


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


@pytest.mark.parametrize("with_pairs", [False, True])
def test_length_sorted_batches_equal_tokenizing_each_batch(tokenizer, with_pairs):
    texts = ["a good film", "bad", "the plot was long and the actors were very tired indeed", "ok then", "fine"]
    pairs = ["it was", "so bad", "yes", "the end of the long long story", "x"] if with_pairs else None
    seen, lengths = [], []
    for idx, batch in length_sorted_batches(tokenizer, texts, pairs, max_length=12, batch_size=2):
        want = tokenize(tokenizer, [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, max_length=12)
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])
        seen += idx.tolist()
        lengths += batch["attention_mask"].sum(1).tolist()
    assert sorted(seen) == list(range(len(texts)))  # every row once
    assert lengths == sorted(lengths) and max(lengths) == 12  # shortest first; truncated at max_length


def test_a_token_budget_cuts_batches_by_padded_size(tokenizer):
    """batch_tokens caps rows x longest row per batch (short texts in big batches, long ones in small), keeps
    at least one row per batch, and every row comes once."""
    from kdlib.tokenize import length_sorted_batches

    texts = ["a"] * 8 + ["a b c d e f g h i j k l m n o p"] * 4
    batches = list(length_sorted_batches(tokenizer, texts, max_length=32, batch_size=64, batch_tokens=24))
    sizes = [(len(idx), enc["input_ids"].shape[1]) for idx, enc in batches]
    assert all(n * t <= 24 or n == 1 for n, t in sizes), sizes
    assert sizes[0] == (8, 3) and {t for _, t in sizes[1:]} == {18}  # the 1-token texts fit 8 x 3 = 24
    assert sorted(i for idx, _ in batches for i in idx.tolist()) == list(range(12))
