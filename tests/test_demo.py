"""The generated demo tasks: deterministic, sized, balanced, disjoint splits, readable by read_split."""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest

from kdlib import demo
from kdlib.demo import DEMO_SPLITS, DEMO_TASKS, generate
from kdlib.readers import read_split

COLUMNS = {"sentiment": ["sentence", "label"], "paraphrase": ["sentence1", "sentence2", "label"],
           "similarity": ["sentence1", "sentence2", "score"]}


@functools.cache
def _split(name: str, split: str) -> pd.DataFrame:
    return generate(name, split)


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_same_seed_same_rows_other_seed_other_rows(name):
    assert_frame = pd.testing.assert_frame_equal
    assert_frame(generate(name, "dev", seed=3), generate(name, "dev", seed=3))
    assert_frame(_split(name, "train"), generate(name, "train", seed=0))
    assert not generate(name, "dev", seed=4).equals(generate(name, "dev", seed=3))


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_sizes_and_columns(name):
    assert DEMO_SPLITS == ("train", "dev")
    for split, size in (("train", 600), ("dev", 300)):
        frame = _split(name, split)
        assert list(frame.columns) == COLUMNS[name]
        assert len(frame) == size


@pytest.mark.parametrize("name", ["sentiment", "paraphrase"])
def test_classes_are_balanced(name):
    for split in DEMO_SPLITS:
        shares = _split(name, split)["label"].value_counts(normalize=True)
        assert len(shares) == 2 and shares.between(0.35, 0.65).all()
    assert set(_split("sentiment", "train")["label"]) == {"positive", "negative"}
    assert set(_split("paraphrase", "train")["label"]) == {0, 1}


def test_similarity_scores_cover_the_range():
    for split in DEMO_SPLITS:
        scores = _split("similarity", split)["score"]
        assert scores.between(0.0, 5.0).all()
        assert scores.min() < 0.5 and scores.max() > 4.5
        # every attribute count 0..5 occurs, so the scores spread over the whole scale
        assert set(np.round(scores).astype(int)) == set(range(6))


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_train_and_dev_share_no_inputs(name):
    inputs = [c for c in COLUMNS[name] if c.startswith("sentence")]
    train = set(map(tuple, _split(name, "train")[inputs].to_numpy()))
    dev = set(map(tuple, _split(name, "dev")[inputs].to_numpy()))
    assert not train & dev


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_dev_comes_from_its_own_random_stream(name, monkeypatch):
    dev = _split(name, "dev")
    # Not train's stream carried on (train restarted is excluded by the no-overlap test):
    # a 900-row train's last 300 rows are not dev.
    monkeypatch.setitem(demo._SIZES, "train", 900)
    longer_train = generate(name, "train").iloc[600:].reset_index(drop=True)
    assert not longer_train.equals(dev)


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_sentences_are_short_and_varied(name):
    frame = _split(name, "train")
    for column in (c for c in COLUMNS[name] if c.startswith("sentence")):
        words = frame[column].str.split().str.len()
        assert words.max() <= 22 and words.min() >= 4
        assert frame[column].nunique() > 0.9 * len(frame)
        assert len({w for s in frame[column] for w in re.findall(r"[a-z]+", s.lower())}) > 100


def test_sentiment_needs_more_than_adjective_counting():
    text = _split("sentiment", "train")["sentence"]
    assert text.str.contains(r"\b(?:not|never|hardly|wasn't|far from|anything but|nobody)\b").mean() > 0.2
    assert text.str.contains(r"\bbut\b|\balthough\b", case=False).mean() > 0.15


def test_paraphrase_word_overlap_does_not_decide_the_label():
    frame = _split("paraphrase", "train")

    def overlap(a, b):
        a, b = set(a.lower().split()), set(b.lower().split())
        return len(a & b) / len(a | b)

    jaccard = np.array([overlap(a, b) for a, b in zip(frame["sentence1"], frame["sentence2"])])
    labels = frame["label"].to_numpy()
    best = max(((jaccard >= t) == labels).mean() for t in np.unique(jaccard))
    assert best < 0.65
    assert (frame["sentence1"] != frame["sentence2"]).all()


def test_similarity_word_overlap_is_a_weak_estimate():
    frame = _split("similarity", "train")
    words = [(set(a.lower().split()), set(b.lower().split()))
             for a, b in zip(frame["sentence1"], frame["sentence2"])]
    jaccard = [len(a & b) / len(a | b) for a, b in words]
    assert np.corrcoef(jaccard, frame["score"])[0, 1] < 0.75


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="train, dev"):
        generate("sentiment", "test")
    with pytest.raises(ValueError, match="sentiment, paraphrase, similarity"):
        generate("nli", "train")


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_read_split_reads_each_demo_task(name):
    spec = DEMO_TASKS[name]
    examples, names = read_split(task=name, split="dev", path=name, format="demo",
                                 text_column=spec.text_column, text_pair_column=spec.text_pair_column,
                                 label_column=spec.label_column, kind=spec.kind,
                                 labels=list(spec.labels) if spec.labels else None)
    raw = _split(name, "dev")
    assert len(examples) == 300 and examples["id"].is_unique
    assert list(examples["text"]) == list(raw[spec.text_column])
    if spec.kind == "classification":
        assert names == list(spec.labels)
        assert list(examples["label"]) == [names.index(str(v)) for v in raw[spec.label_column]]
    else:
        assert names == []
        np.testing.assert_array_equal(examples["label"].to_numpy(), raw["score"].to_numpy())
        assert list(examples["text_pair"]) == list(raw["sentence2"])


def test_read_split_demo_errors():
    from kdlib.errors import DataError

    with pytest.raises(DataError, match="the demo tasks are: sentiment, paraphrase, similarity"):
        read_split(task="x", split="train", path="nli", format="demo", text_column="sentence",
                   text_pair_column=None, label_column="label", kind="classification", labels=None)
    with pytest.raises(DataError, match="no split 'test'"):
        read_split(task="x", split="test", path="sentiment", format="demo", text_column="sentence",
                   text_pair_column=None, label_column="label", kind="classification", labels=None)
