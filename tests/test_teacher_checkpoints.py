"""The user's own teachers (tasks.<t>.teacher_checkpoints): checkpoints of every encoder family, checked against
the task before any labeling, labeled with their own tokenizers, fingerprinted into the store key, and distilled
by jobs/distill.py into end-to-end and branched students."""

from __future__ import annotations

import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_run_overrides
from kdlib.config import load_run_config
from kdlib.errors import ConfigError, KdlibError
from kdlib.labeling import ShardLabeler
from kdlib.pipeline import RunContext, load_data, plan_labels, train_teachers
from kdlib.teacher_checkpoints import CheckpointTeacher, files_digest, resolve_members
from kdlib.tune.config import load_tune_config
from tiny_checkpoints import FAMILIES, plain_logits, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TEXTS = ["a good movie", "boring and far too long in every single way", "the plot", "an utterly charming delight"]
PAIRS = ["a bad film", "the best film of the year", "thin", "not worth the time"]


def resolve(folder, *, kind="classification", labels=("negative", "positive"), label_map=None, max_length=32):
    return resolve_members(task="sentiment", kind=kind, label_names=list(labels), checkpoints=[str(folder)],
                           label_map=label_map, max_length=max_length)


def label_with(members, texts=TEXTS, pairs=PAIRS, batch_size=2) -> np.ndarray:
    """A labeling actor's (N, K, C) logits for `members`, without Ray (the actor's own code)."""
    labeler = ShardLabeler(ensembles={}, stores={}, encoder_source="", random_init=False, config_overrides={},
                           seed=0, max_length=32, torch_threads=1, batch_size=batch_size, emit_rows=False,
                           checkpoints={"sentiment": members})
    frame = labeler.label("sentiment", pd.DataFrame({"text": texts, "text_pair": pairs}))
    return np.array(frame["teacher_logits"].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_labels_as_plain_transformers_in_the_tasks_label_order(tmp_path, family):
    """The checkpoint's labels are [positive, negative], the task's [negative, positive]: the stored logits are
    plain transformers' logits with the columns swapped, for pairs of different lengths in batches of 2."""
    folder = tiny_checkpoint(tmp_path / family, family, ["positive", "negative"], seed=3)
    [member] = resolve(folder)
    assert member.family == family and member.outputs == (1, 0)
    got = label_with([member])[:, 0]
    expected = plain_logits(folder, TEXTS, PAIRS)[:, [1, 0]].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(expected[:, 0] - expected[:, 1]).max() > 1e-3  # a swap would show


def test_mixed_ensemble_members_keep_their_own_tokenizers_and_length_limits(tmp_path):
    """A RoBERTa (BPE, 16 positions: 14 tokens) and a BERT member (WordPiece, the run's 32) in one ensemble:
    each member's logits are its own plain transformers logits at its own limit."""
    roberta = tiny_checkpoint(tmp_path / "r", "roberta", ["negative", "positive"], max_position_embeddings=16)
    bert = tiny_checkpoint(tmp_path / "b", "bert", ["negative", "positive"], seed=1)
    members = resolve_members(task="sentiment", kind="classification", label_names=["negative", "positive"],
                              checkpoints=[str(roberta), str(bert)], label_map=None, max_length=32)
    assert [m.max_length for m in members] == [14, 32]  # RoBERTa's positions start after padding_idx (1) + 1
    got = label_with(members)
    np.testing.assert_allclose(got[:, 0], plain_logits(roberta, TEXTS, PAIRS, max_length=14).numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 1], plain_logits(bert, TEXTS, PAIRS, max_length=32).numpy(), atol=1e-5)


def test_label_map_matches_generic_label_names(tmp_path):
    folder = tiny_checkpoint(tmp_path / "c", "distilbert", ["LABEL_0", "LABEL_1"])
    with pytest.raises(ConfigError) as e:
        resolve(folder)
    msg = str(e.value)
    assert str(folder) in msg and "['LABEL_0', 'LABEL_1']" in msg and "['negative', 'positive']" in msg
    assert "teacher_label_map" in msg
    [member] = resolve(folder, label_map={"LABEL_0": "positive", "LABEL_1": "negative"})
    assert member.outputs == (1, 0)


@pytest.mark.parametrize("case, expected", [
    ("three_outputs", r"has 3 outputs \['a', 'b', 'c'\], the task 2 labels \['negative', 'positive'\]"),
    ("classification_for_regression", r"a classification checkpoint with 2 outputs .* for a regression task"),
    ("regression_for_classification", r"a one-output \(regression\) checkpoint for a classification task"),
    ("no_tokenizer", r"no usable tokenizer in .*save the tokenizer"),
    ("no_config", r"holds no config.json"),
    ("missing_folder", r"no such folder"),
    ("two_map_to_one", r"two map to one label"),
])
def test_mismatched_checkpoints_fail_naming_the_checkpoint_before_labeling(tmp_path, case, expected):
    folder = tmp_path / case
    kind, label_map = "classification", None
    if case == "three_outputs":
        tiny_checkpoint(folder, "bert", ["a", "b", "c"])
    elif case == "classification_for_regression":
        tiny_checkpoint(folder, "bert", ["negative", "positive"])
        kind = "regression"
    elif case == "regression_for_classification":
        tiny_checkpoint(folder, "electra", None)
    elif case == "no_tokenizer":
        tiny_checkpoint(folder, "roberta", ["negative", "positive"], tokenizer=False)
    elif case == "no_config":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
    elif case == "missing_folder":
        folder = tmp_path / "nowhere"
    elif case == "two_map_to_one":
        tiny_checkpoint(folder, "bert", ["LABEL_0", "LABEL_1"])
        label_map = {"LABEL_0": "positive", "LABEL_1": "positive"}
    with pytest.raises(ConfigError, match=expected) as e:
        resolve(folder, kind=kind, labels=("negative", "positive") if kind == "classification" else (),
                label_map=label_map)
    assert "tasks.sentiment.teacher_checkpoints" in str(e.value)


def test_a_checkpoint_that_is_not_a_path_goes_to_the_hub_and_says_so_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'someone/sst2-roberta'.*the model hub could not provide it"):
        resolve_members(task="sentiment", kind="classification", label_names=["negative", "positive"],
                        checkpoints=["someone/sst2-roberta"], label_map=None, max_length=32)


def test_relative_checkpoint_paths_are_read_from_where_the_job_starts(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "teachers" / "a", "bert", ["negative", "positive"])
    monkeypatch.chdir(tmp_path)
    [member] = resolve_members(task="sentiment", kind="classification", label_names=["negative", "positive"],
                               checkpoints=["teachers/a"], label_map=None, max_length=32)
    assert member.source == str((tmp_path / "teachers" / "a").resolve()) and member.name == "teachers/a"


def test_the_digest_follows_the_weights_and_the_tokenizer(tmp_path):
    folder = tiny_checkpoint(tmp_path / "c", "bert", ["negative", "positive"])
    before = files_digest(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert files_digest(copy) == before  # where it lives is not what it is
    state = load_file(folder / "model.safetensors")
    name = next(k for k in state if k.endswith("classifier.weight"))
    state[name] = state[name] + 0.01
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert files_digest(folder) != before
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNK2]"', 1))
    assert files_digest(copy) != before


def test_config_rules_for_teacher_checkpoints(tmp_path):
    base = tiny_run_overrides(tmp_path)
    with pytest.raises(KdlibError, match="teacher_label_map maps the labels of teacher_checkpoints"):
        load_run_config(DEMO, base + ["tasks.sentiment.teacher_label_map={LABEL_0: negative}"])
    with pytest.raises(KdlibError, match="teacher: false trains no teacher and uses none"):
        load_run_config(DEMO, base + ["tasks.sentiment.teacher=false", "tasks.sentiment.augment.copies=0",
                                      "tasks.sentiment.teacher_checkpoints=[/x]"])
    with pytest.raises(KdlibError, match="the depth search trains its own teachers"):
        load_tune_config(ROOT / "configs" / "tune" / "demo.yaml", ["tasks.sentiment.teacher_checkpoints=[/x]"])


# ---------------------------------------------------------------------------------------------- the job, end to end


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """sentiment: a RoBERTa (labels reversed) and a DistilBERT (LABEL_k, mapped); similarity: one-output ELECTRA."""
    root = tmp_path_factory.mktemp("teachers")
    return {"roberta": tiny_checkpoint(root / "sst-roberta", "roberta", ["positive", "negative"], seed=1),
            "distilbert": tiny_checkpoint(root / "sst-distilbert", "distilbert", ["LABEL_0", "LABEL_1"], seed=2),
            "electra": tiny_checkpoint(root / "sts-electra", "electra", None, seed=3)}


def external_overrides(storage_root, checkpoints) -> list[str]:
    return tiny_run_overrides(storage_root) + [
        f"tasks.sentiment.teacher_checkpoints=[{checkpoints['roberta']}, {checkpoints['distilbert']}]",
        "tasks.sentiment.teacher_label_map={LABEL_0: negative, LABEL_1: positive}",
        f"tasks.similarity.teacher_checkpoints=[{checkpoints['electra']}]",
        "tasks.sentiment.augment.copies=1", "distill.num_workers=1", "distill.epochs=1"]


@pytest.fixture(scope="module")
def external_runs(ray_session, checkpoints, tmp_path_factory):
    """jobs/distill.py twice on the same teachers: a CMOW student, then the branched one (labels reused)."""
    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    root = tmp_path_factory.mktemp("external")
    overrides = external_overrides(root, checkpoints)
    runs = {}
    for kind in ("cmow", "branched"):
        assert job["main"]([str(DEMO), *overrides, f"student.kind={kind}", f"run_name={kind}"]) == 0
        runs[kind] = json.loads((root / kind / "results.json").read_text())
        runs[kind + "_log"] = (root / kind / "run.log").read_text()
    return root, overrides, runs


@pytest.mark.slow
def test_job_distils_external_teachers_and_their_ensemble_score_is_plain_transformers(external_runs, checkpoints):
    root, overrides, runs = external_runs
    ctx = RunContext.create(load_run_config(DEMO, overrides), log=lambda line: None)
    tasks = load_data(ctx)
    sent, sim = tasks["sentiment"].dev, tasks["similarity"].dev
    # sentiment: the mean of both members' logits in the task's order (negative, positive), as plain transformers
    roberta = plain_logits(checkpoints["roberta"], sent["text"].tolist())[:, [1, 0]]
    distil = plain_logits(checkpoints["distilbert"], sent["text"].tolist())
    pred = ((roberta + distil) / 2).argmax(1).numpy()
    accuracy = 100 * float((pred == sent["label"].to_numpy()).mean())
    # similarity: the one member's prediction, Pearson against the gold scores
    out = plain_logits(checkpoints["electra"], sim["text"].tolist(), sim["text_pair"].tolist())[:, 0].numpy()
    pearson = 100 * float(np.corrcoef(out, sim["label"].to_numpy())[0, 1])
    for kind in ("cmow", "branched"):
        scores = runs[kind]["scores"]
        assert scores["sentiment"]["primary"]["ensemble"] == pytest.approx(accuracy, abs=1e-6)
        assert scores["similarity"]["primary"]["ensemble"] == pytest.approx(pearson, abs=1e-3)
        assert len(scores["sentiment"]["primary"]["members"]) == 2
        assert len(scores["paraphrase"]["primary"]["members"]) == 2  # kdlib trained this task's ensemble
        assert all(np.isfinite(s["primary"]["student"]) for s in scores.values())
    assert runs["branched"]["layers"]["branches"] == {"sentiment": 2, "paraphrase": 2, "similarity": 1}
    # the second run reused the first one's soft targets: same teachers, same inputs
    log = runs["branched_log"]
    assert re.search(r"\[labels:sentiment\] inputs unchanged, reusing", log), log
    assert re.search(r"\[teachers:sentiment\] 2 checkpoints, not trained here: .*\(roberta, .*\(distilbert, ", log)


@pytest.mark.slow
def test_store_records_each_member_and_a_changed_checkpoint_relabels(external_runs, checkpoints, tmp_path):
    root, overrides, runs = external_runs
    ctx = RunContext.create(load_run_config(DEMO, overrides), log=lambda line: None)
    tasks = load_data(ctx)
    labels = plan_labels(ctx, tasks, train_teachers(ctx, tasks))
    store = labels.stores["sentiment"]
    assert store.is_complete()
    recorded = json.loads((Path(store.location) / "manifest.json").read_text())["teachers"]["checkpoints"]
    assert [(m["name"], m["family"], m["digest"]) for m in recorded] == [
        (str(checkpoints["roberta"]), "roberta", files_digest(checkpoints["roberta"])),
        (str(checkpoints["distilbert"]), "distilbert", files_digest(checkpoints["distilbert"]))]
    # the same RoBERTa member with other weights: a new store for sentiment; similarity's is untouched
    changed = tiny_checkpoint(tmp_path / "sst-roberta", "roberta", ["positive", "negative"], seed=9)
    overrides2 = [o.replace(str(checkpoints["roberta"]), str(changed)) for o in overrides]
    ctx2 = RunContext.create(load_run_config(DEMO, overrides2), log=lambda line: None)
    labels2 = plan_labels(ctx2, tasks, train_teachers(ctx2, tasks))
    assert labels2.stores["sentiment"].key != store.key and not labels2.stores["sentiment"].is_complete()
    assert labels2.stores["similarity"].key == labels.stores["similarity"].key


def test_checkpoint_teacher_takes_only_the_inputs_its_model_does(tmp_path):
    """DistilBERT saved with a BERT tokenizer (which returns token_type_ids): its forward never sees them."""
    folder = tiny_checkpoint(tmp_path / "d", "distilbert", ["negative", "positive"])
    [member] = resolve(folder)
    teacher = CheckpointTeacher(member, torch.device("cpu"))
    assert "token_type_ids" not in teacher.inputs and "input_ids" in teacher.inputs
