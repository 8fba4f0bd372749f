"""kdlib's own teachers as standard transformers checkpoints (kdlib.teacher_export): plain transformers
reproduces every member's logits, and `teacher_checkpoints` takes them back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, pipeline

from conftest import TINY_ENCODER
from kdlib.artifact import load_model
from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.errors import ConfigError
from kdlib.labeling import ShardLabeler
from kdlib.teacher_checkpoints import resolve_members
from kdlib.teachers import train_ensemble

SOURCE = resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2")
TEXTS = ["a fine film", "not good at all, and far too long for what it has to say", "ok", "the best of the year"]
PAIRS = ["it was fine", "bad", "sure thing", "a dull story"]


def train(folder: Path, pooling: str, kind: str = "classification") -> Path:
    """A 2-member ensemble of L = 2 on the tiny random 4-layer encoder, one epoch, its members exported."""
    rng = np.random.default_rng(0)
    n = 48
    train_rows = pd.DataFrame({"text": [TEXTS[i % 4] + f" {i}" for i in range(n)],
                               "text_pair": [PAIRS[i % 4] for i in range(n)],
                               "label": rng.integers(0, 2, n) if kind == "classification" else rng.random(n) * 5})
    train_ensemble(task="t", kind=kind, label_names=["neg", "pos"] if kind == "classification" else [],
                   metric="accuracy" if kind == "classification" else "pearson", train=train_rows,
                   encoder_source=SOURCE, random_init=True, config_overrides=TINY_ENCODER, pooling=pooling,
                   max_length=32, fine_tune_layers=2, members=2, epochs=1, batch_size=16, lr=1e-3, head_lr=1e-2,
                   weight_decay=0.0, seed=0, out_dir=str(folder / "ensemble"),
                   checkpoints_dir=str(folder / "checkpoints"), log=lambda line: None)
    return folder


def kdlib_logits(folder: Path, pairs=PAIRS) -> dict[str, np.ndarray]:
    """Every member's logits as kdlib runs the ensemble (shared trunk, then each branch)."""
    encoder = load_encoder(SOURCE, True, TINY_ENCODER, seed=0)
    model, manifest = load_model(folder / "ensemble", encoder=encoder)
    enc = load_tokenizer(SOURCE)(TEXTS, pairs, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).items()}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_plain_transformers_pipeline_reproduces_every_members_logits(tmp_path, pooling):
    folder = train(tmp_path, pooling)
    expected = kdlib_logits(folder)
    for member in ("t__m0", "t__m1"):
        ckpt = folder / "checkpoints" / member
        config = json.loads((ckpt / "config.json").read_text())
        assert config["id2label"] == {"0": "neg", "1": "pos"}
        if pooling == "cls":  # transformers' own class, no code of kdlib's
            assert config["architectures"] == ["BertForSequenceClassification"] and "auto_map" not in config
            assert isinstance(AutoModelForSequenceClassification.from_pretrained(ckpt), BertForSequenceClassification)
        classify = pipeline("text-classification", model=str(ckpt), trust_remote_code=pooling == "mean",
                            top_k=None, function_to_apply="none")
        got = [{d["label"]: d["score"] for d in out}
               for out in classify([{"text": t, "text_pair": p} for t, p in zip(TEXTS, PAIRS)])]
        np.testing.assert_allclose(np.array([[g["neg"], g["pos"]] for g in got]), expected[member], atol=1e-4)
        assert np.abs(expected["t__m0"] - expected["t__m1"]).max() > 1e-3  # the members differ


def test_teacher_checkpoints_take_kdlibs_own_and_label_as_the_ensemble_did(tmp_path):
    """The exported members as teacher_checkpoints: the labeling actor's logits equal the kdlib ensemble's."""
    folder = train(tmp_path, "mean")
    members = resolve_members(task="t", kind="classification", label_names=["neg", "pos"], max_length=32,
                              label_map=None,
                              checkpoints=[str(folder / "checkpoints" / m) for m in ("t__m0", "t__m1")])
    assert [m.remote_code for m in members] == [True, True]
    labeler = ShardLabeler(ensembles={}, stores={}, encoder_source="", random_init=False, config_overrides={},
                           seed=0, max_length=32, torch_threads=1, batch_size=3, emit_rows=False,
                           checkpoints={"t": members})
    got = np.array(labeler.label("t", pd.DataFrame({"text": TEXTS, "text_pair": PAIRS}))["teacher_logits"].tolist())
    expected = kdlib_logits(folder)
    np.testing.assert_allclose(got[:, 0], expected["t__m0"], atol=1e-4)
    np.testing.assert_allclose(got[:, 1], expected["t__m1"], atol=1e-4)


def test_a_regression_member_exports_one_output(tmp_path):
    folder = train(tmp_path, "cls", kind="regression")
    [member] = resolve_members(task="t", kind="regression", label_names=[], label_map=None, max_length=32,
                               checkpoints=[str(folder / "checkpoints" / "t__m0")])
    assert member.outputs == (0,)
    model = AutoModelForSequenceClassification.from_pretrained(folder / "checkpoints" / "t__m0")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_checkpoints_that_bring_other_code_are_refused(tmp_path):
    """Only kdlib's own modeling file (byte for byte) is run: an altered copy is foreign code."""
    folder = train(tmp_path, "mean")
    ckpt = tmp_path / "altered"
    shutil.copytree(folder / "checkpoints" / "t__m0", ckpt)
    (ckpt / "modeling_kdlib.py").write_text((ckpt / "modeling_kdlib.py").read_text() + "\nprint('hello')\n")
    with pytest.raises(ConfigError, match=r"brings its own model code .* which kdlib does not run"):
        resolve_members(task="t", kind="classification", label_names=["neg", "pos"], label_map=None,
                        max_length=32, checkpoints=[str(ckpt)])


def test_exported_members_share_their_identical_bottom_layers_when_labeling(tmp_path):
    """kdlib's exported members hold the same embeddings and frozen bottom 2 layers: the labeling actor runs
    those once per batch (one SharedBottom of depth 2), and the logits stay each member's own. A member of
    another ensemble (other weights everywhere) runs alone."""
    from kdlib.teacher_checkpoints import CheckpointTeacher, SharedBottom, shared_bottom_groups

    folder = train(tmp_path / "a", "mean")
    other = train(tmp_path / "b", "cls")  # same encoder, so same embeddings and trunk: it joins the group too
    paths = [folder / "checkpoints" / "t__m0", folder / "checkpoints" / "t__m1", other / "checkpoints" / "t__m0"]
    members = resolve_members(task="t", kind="classification", label_names=["neg", "pos"], label_map=None,
                              max_length=32, checkpoints=[str(p) for p in paths])
    groups = shared_bottom_groups([CheckpointTeacher(m, torch.device("cpu")) for m in members])
    [(positions, runner)] = groups
    assert positions == [0, 1, 2] and isinstance(runner, SharedBottom) and runner.depth == 2
    labeler = ShardLabeler(ensembles={}, stores={}, encoder_source="", random_init=False, config_overrides={},
                           seed=0, max_length=32, torch_threads=1, batch_size=3, emit_rows=False,
                           checkpoints={"t": members})
    got = np.array(labeler.label("t", pd.DataFrame({"text": TEXTS, "text_pair": PAIRS}))["teacher_logits"].tolist())
    for k, (f, member) in enumerate([(folder, "t__m0"), (folder, "t__m1"), (other, "t__m0")]):
        np.testing.assert_allclose(got[:, k], kdlib_logits(f)[member], atol=1e-4)
