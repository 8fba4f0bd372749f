"""The soft-target store and the augmentation that feeds it: plain files, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kdlib import storage
from kdlib.augment import mask_words, masked_copies, read_unlabeled, write_unlabeled
from kdlib.errors import DataError
from kdlib.soft_targets import SoftTargetStore, StoreError, carry_over, plan_shards, teacher_logits_array


def _examples(n_train=7, n_dev=3, task="t") -> pd.DataFrame:
    rows = [{"id": f"{s}{i}", "task": task, "split": s, "source": "original", "text": f"word {i} here",
             "text_pair": None, "label": float(i % 2)} for s, n in (("train", n_train), ("dev", n_dev))
            for i in range(n)]
    return pd.DataFrame(rows)


def _labeled(examples: pd.DataFrame, k=2, c=2) -> pd.DataFrame:
    frame = examples.copy()
    # Member logits equal to the example's number, so rows can be traced through the store.
    frame["teacher_logits"] = [np.full((k, c), int(i), dtype=np.float32).tolist()
                               for i in frame["id"].str.replace(r"^\D+", "", regex=True)]
    return frame


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """The storage root: a local folder, or a bucket on the tests' S3 endpoint."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_root")


def test_plan_puts_dev_first_never_mixes_splits_and_is_deterministic():
    ex = _examples()
    plan = plan_shards("t", ex, shard_size=3)
    assert [(s.split, s.rows) for s, _ in plan] == [("dev", 3), ("train", 3), ("train", 3), ("train", 1)]
    assert [s.index for s, _ in plan] == [0, 1, 2, 3]
    assert [s for s, _ in plan_shards("t", ex, 3)] == [s for s, _ in plan]
    with pytest.raises(ValueError, match="more than once"):
        plan_shards("t", pd.concat([ex, ex.iloc[:1]]), 3)


def test_commit_finalize_read_round_trip(root):
    store = SoftTargetStore(root, "t", "k1")
    plan = plan_shards("t", _examples(), shard_size=4)
    for shard, ex in plan:
        store.commit(shard, _labeled(ex))
    manifest = store.finalize([s for s, _ in plan], {"teachers": "x"})
    assert manifest["rows"] == 10 and manifest["rows_by_split"] == {"dev": 3, "train": 7}
    manifest_at = storage.child(root, "soft_targets", "t", "k1", "manifest.json")
    assert json.loads(storage.read_text_at(manifest_at))["teachers"] == "x"
    train = store.read(split="train")
    assert list(train["id"]) == [f"train{i}" for i in range(7)]
    assert teacher_logits_array(train).shape == (7, 2, 2)
    np.testing.assert_array_equal(teacher_logits_array(train)[:, 1, 0], np.arange(7))
    assert np.isnan(store.read().query("split == 'dev'")["label"]).sum() == 0


def test_commit_rejects_rows_that_are_not_the_planned_shard(tmp_path):
    store = SoftTargetStore(str(tmp_path), "t", "k")
    (shard, ex), *_ = plan_shards("t", _examples(), shard_size=4)
    with pytest.raises(StoreError, match="do not match its plan"):
        store.commit(shard, _labeled(ex.iloc[:-1]))
    with pytest.raises(StoreError, match="do not match its plan"):
        store.commit(shard, _labeled(ex.iloc[::-1]))


def test_a_tampered_shard_is_not_counted_and_fails_reads(root):
    store = SoftTargetStore(root, "t", "k")
    plan = plan_shards("t", _examples(), shard_size=4)
    for shard, ex in plan:
        store.commit(shard, _labeled(ex))
    store.finalize([s for s, _ in plan], {})
    fs, path = storage.filesystem(storage.child(root, "soft_targets", "t", "k", "shards", "00001.parquet"))
    data = bytearray(storage.read_bytes(fs, path))
    data[len(data) // 2] ^= 0xFF
    storage.write_atomic(fs, path, bytes(data))
    assert store.commit_record(plan[1][0]) is None  # a resume would relabel it
    assert store.commit_record(plan[0][0]) is not None
    with pytest.raises(StoreError, match="checksum"):
        store.read(split="train")
    with pytest.raises(StoreError, match="checksum"):
        store.verify()


def test_a_shard_committed_for_another_plan_does_not_count(tmp_path):
    store = SoftTargetStore(str(tmp_path), "t", "k")
    (shard, ex), *_ = plan_shards("t", _examples(), shard_size=4)
    store.commit(shard, _labeled(ex))
    other, _ = plan_shards("t", _examples(n_dev=4), shard_size=4)[0]  # same index, other ids
    assert other.index == shard.index and store.commit_record(other) is None
    with pytest.raises(StoreError, match="not committed"):
        store.finalize([other], {})


def test_reading_an_unfinished_store_says_so(tmp_path):
    with pytest.raises(StoreError, match="no manifest"):
        SoftTargetStore(str(tmp_path), "t", "k").read()


def test_mask_words_masks_about_p_of_the_words():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(2000))
    masked = mask_words(text, 0.1, rng, "[MASK]").split()
    assert len(masked) == 2000
    share = masked.count("[MASK]") / 2000
    assert 0.08 < share < 0.12
    assert all(m in ("[MASK]", f"w{i}") for i, m in enumerate(masked))
    assert mask_words(text, 0.0, rng, "[MASK]") == text


def test_masked_copies_carry_no_gold_label_and_stable_ids():
    train = _examples(n_train=5, n_dev=0)
    train["text_pair"] = [f"other {i} text" for i in range(5)]
    aug = masked_copies(train, copies=3, p=0.5, seed=1, mask_token="[MASK]")
    assert len(aug) == 15 and aug["id"].is_unique
    assert set(aug["id"]) == {f"train{i}~m{k}" for i in range(5) for k in range(3)}
    assert aug["label"].isna().all() and (aug["source"] == "augmented").all() and (aug["split"] == "train").all()
    assert aug["text_pair"].notna().all()
    assert aug["text"].str.contains(r"\[MASK\]").any() and aug["text_pair"].str.contains(r"\[MASK\]").any()
    again = masked_copies(train, copies=3, p=0.5, seed=1, mask_token="[MASK]")
    pd.testing.assert_frame_equal(aug, again)
    assert not aug.equals(masked_copies(train, copies=3, p=0.5, seed=2, mask_token="[MASK]"))
    assert masked_copies(train, copies=0, p=0.1, seed=1, mask_token="[MASK]").empty


def test_unlabeled_text_files(tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("a first sentence\n\nsecond one\na first sentence\n")
    rows = read_unlabeled(str(single), task="t", has_pair=False)
    assert list(rows["text"]) == ["a first sentence", "second one", "a first sentence"]
    assert rows["id"].is_unique and rows["label"].isna().all() and (rows["source"] == "unlabeled").all()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("left one\tright one\nleft two\tright two\n")
    assert list(read_unlabeled(str(pairs), task="t", has_pair=True)["text_pair"]) == ["right one", "right two"]
    bad = tmp_path / "bad.txt"
    bad.write_text("left\tright\njust one\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2: expected two tab-separated sentences"):
        read_unlabeled(str(bad), task="t", has_pair=True)
    with pytest.raises(DataError, match="line 1: expected one sentence without tabs"):
        read_unlabeled(str(pairs), task="t", has_pair=False)
    with pytest.raises(DataError, match="not found"):
        read_unlabeled(str(tmp_path / "missing.txt"), task="t", has_pair=False)


def test_unlabeled_text_is_read_like_a_headerless_tsv(tmp_path):
    # the task files' rules: a BOM is dropped, a bad byte or an empty sentence fails naming its line
    path = tmp_path / "u.txt"
    path.write_bytes("first\tsecond\n".encode("utf-8-sig"))
    assert list(read_unlabeled(str(path), task="t", has_pair=True)["text"]) == ["first"]
    path.write_bytes(b"fine\tok\n\nbad \xff byte\tok\n")
    with pytest.raises(DataError, match=r"u.txt, line 3: not UTF-8 text: byte 0xff at character 5"):
        read_unlabeled(str(path), task="t", has_pair=True)
    path.write_text("fine\tok\nleft\t \n")
    with pytest.raises(DataError, match=r"u.txt, line 2: empty second sentence"):
        read_unlabeled(str(path), task="t", has_pair=True)
    with pytest.raises(DataError, match="is a folder"):
        read_unlabeled(str(tmp_path), task="t", has_pair=False)


def test_written_unlabeled_text_reads_back(tmp_path):
    """write_unlabeled keeps every example on one line (tabs and line breaks inside become spaces) and
    skips blank ones, so read_unlabeled returns the same sentences."""
    texts, pairs = ["a\tfirst\nsentence", "  ", "second  one"], ["right\r\none", "x", "right two"]
    assert write_unlabeled(texts, pairs, str(tmp_path / "p.txt")) == 2
    back = read_unlabeled(str(tmp_path / "p.txt"), task="t", has_pair=True)
    assert list(zip(back["text"], back["text_pair"])) == [("a first sentence", "right one"), ("second one", "right two")]
    assert write_unlabeled(["only", "two"], None, str(tmp_path / "s.txt")) == 2
    assert list(read_unlabeled(str(tmp_path / "s.txt"), task="t", has_pair=False)["text"]) == ["only", "two"]


def test_carry_over_copies_what_another_version_labeled_with_the_same_teachers(root):
    """A new version (more examples) gets the shards whose every example an older complete version holds,
    with the older logits; shards with a new example, a changed text under the same id, or only in a version
    of other teachers or another max_length are left to label."""
    old = _examples(n_train=6, n_dev=3)
    first = SoftTargetStore(root, "t", "v1")
    plan = plan_shards("t", old, shard_size=3)
    for shard, ex in plan:
        first.commit(shard, _labeled(ex))
    first.finalize([s for s, _ in plan], {"teachers": {"fingerprint": "T"}, "max_length": 64})
    other = SoftTargetStore(root, "t", "v0")  # other teachers: must not be used even though it holds train9
    more = _examples(n_train=10, n_dev=3)
    plan_other = plan_shards("t", more, shard_size=3)
    for shard, ex in plan_other:
        other.commit(shard, _labeled(ex).assign(teacher_logits=[[[99.0, 99.0]] * 2] * len(ex)))
    other.finalize([s for s, _ in plan_other], {"teachers": {"fingerprint": "U"}, "max_length": 64})

    more.loc[more["id"] == "train4", "text"] = "a masked copy with an old id"
    new = SoftTargetStore(root, "t", "v2")
    plan_new = plan_shards("t", more, shard_size=3)  # dev0-2 | train0-2 | train3-5 | train6-8 | train9
    assert carry_over(new, plan_new, teachers="U", max_length=32) == {"shards": 0, "rows": 0, "from": []}
    carried = carry_over(new, plan_new, teachers="T", max_length=64)
    assert carried == {"shards": 2, "rows": 6, "from": ["v1"]}  # dev and train0-2; train4's text changed
    committed = [s.index for s, _ in plan_new if new.commit_record(s) is not None]
    assert committed == [0, 1]
    rows = new.read_committed([s for s, _ in plan_new[:2]])
    assert list(rows["id"]) == ["dev0", "dev1", "dev2", "train0", "train1", "train2"]
    np.testing.assert_array_equal(teacher_logits_array(rows)[:, 0, 0], [0, 1, 2, 0, 1, 2])  # v1's, not v0's 99s
    assert carry_over(new, plan_new, teachers="T", max_length=64)["shards"] == 0  # committed now: nothing to do
