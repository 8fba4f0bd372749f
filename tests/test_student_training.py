"""The pieces that let end-to-end students train in the Ray Train loop: token features, artifacts, trainees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertModel

from kdlib.artifact import ArtifactError, load_model
from kdlib.predict import predict_student
from kdlib.students import TaskHead, build_student_model, make_student_inputs
from kdlib.students.artifact import load_student, save_student
from kdlib.students.features import TokenFeatures
from kdlib.train_state import load_weights, save_train_state
from kdlib.encoder import EncoderRef, resolve_encoder_path
from kdlib.train_spec import StudentSpec, TaskSpec, TrainSpec
from kdlib.trainees import PerTaskCopiesTrainee, make_trainee

TEXTS = ["a fine film", "not good at all , sadly", "ok", "the plot is thin but the cast is great"]
PAIRS = ["it was fine", "bad", "fine enough i think", "great cast"]
TASKS = {"sent": TaskHead("classification", 2), "para": TaskHead("classification", 2, pair=True),
         "sim": TaskHead("regression", 1, pair=True), "binned": TaskHead("regression", 6, pair=True, bins=(0, 5, 1))}
SMALL = {"small_transformer": {"num_layers": 2, "head_hidden": 8},
         "bilstm": {"hidden": 8, "ffn_dim": 8, "head_hidden": 8},
         "cmow": {"matrix_dim": 4, "cbow_dim": 8, "head_hidden": 8}}


def cmow_spec(*, per_task: bool) -> TrainSpec:
    """A small CMOW student's TrainSpec over TASKS, with MiniLM's tokenizer."""
    name = "sentence-transformers/all-MiniLM-L6-v2"
    return TrainSpec(
        tasks={t: TaskSpec(kind=h.kind, num_outputs=h.num_outputs, pair=h.pair, bins=h.bins, branch_layers=1,
                           fine_tune_layers=1, aggregation="mean", wrong_teacher_weight=0.5, objective="kl")
               for t, h in TASKS.items()},
        encoder=EncoderRef(name=name, source=resolve_encoder_path(name), fingerprint="test"),
        student=StudentSpec(kind="cmow", hparams=SMALL["cmow"]), per_task=per_task, epochs=1, batch_size=4,
        lr=1e-3, weight_decay=0.0, temperature=1.0, alpha=0.5)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32), add_pooling_layer=False).eval()


@pytest.mark.parametrize("pairs", [None, PAIRS])
def test_token_features_batch_equals_tokenizing_the_batch(tokenizer, pairs):
    feats = TokenFeatures.compute(tokenizer, TEXTS, pairs or [None] * len(TEXTS), max_length=16)
    idx = [3, 1]
    got = feats.batch(idx)
    want = make_student_inputs(tokenizer, [TEXTS[i] for i in idx], None if pairs is None else [pairs[i] for i in idx],
                               max_length=16)
    for name in ("input_ids", "attention_mask", "token_type_ids", "a_ids", "a_mask", "b_ids", "b_mask"):
        g, w = getattr(got, name), getattr(want, name)
        assert g is None if w is None else torch.equal(g, w), name
    assert got.has_pair == (pairs is not None)
    assert feats.lengths == [int(m.sum()) for m in make_student_inputs(tokenizer, TEXTS, pairs, max_length=16).attention_mask]


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_student_artifact_round_trip_gives_the_same_outputs(kind, tokenizer, encoder, tmp_path):
    torch.manual_seed(1)
    model = build_student_model(kind, tasks=TASKS, vocab_size=len(tokenizer), encoder=encoder, **SMALL[kind]).eval()
    hparams = dict(SMALL[kind], **({"embedding_dim": 16} if kind == "bilstm" else {}))
    save_student(model, tmp_path / "s", name=kind, hparams=hparams, tasks={"sent": {"kind": "classification"}})
    loaded, manifest = load_student(tmp_path / "s")
    assert manifest["student"] == kind and manifest["vocab_size"] == len(tokenizer)
    inputs = make_student_inputs(tokenizer, TEXTS, PAIRS, max_length=16)
    single = make_student_inputs(tokenizer, TEXTS, None, max_length=16)
    with torch.no_grad():
        assert_close(loaded(single, "sent"), model(single, "sent"))
        assert_close(loaded.forward_tasks(inputs, ["para", "sim", "binned"]),
                     model.forward_tasks(inputs, ["para", "sim", "binned"]))
    assert loaded.tasks["binned"].bins == (0.0, 5.0, 1.0)


def test_a_binned_head_predicts_the_expected_score(tokenizer):
    model = build_student_model("cmow", tasks=TASKS, vocab_size=len(tokenizer), **SMALL["cmow"]).eval()
    with torch.no_grad():
        logits = model(make_student_inputs(tokenizer, TEXTS, PAIRS, max_length=16), "binned")
        got = predict_student(model, tokenizer, TEXTS, PAIRS, ["binned"], max_length=16)["binned"]
    assert logits.shape == (4, 6) and got.shape == (4, 1)
    want = (torch.softmax(logits, -1) * torch.arange(6.0)).sum(-1, keepdim=True)
    assert_close(torch.from_numpy(got), want)
    with pytest.raises(ValueError, match="one output per bin"):
        TaskHead("regression", 5, bins=(0, 5, 1))


def test_student_artifacts_are_checked_and_not_mistaken_for_branched_models(tokenizer, tmp_path):
    model = build_student_model("cmow", tasks=TASKS, vocab_size=len(tokenizer), **SMALL["cmow"])
    save_student(model, tmp_path / "s", name="cmow", hparams=SMALL["cmow"])
    with pytest.raises(ArtifactError, match="not a branched model"):
        load_model(tmp_path / "s")
    weights = tmp_path / "s" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_student(tmp_path / "s")


def test_fine_tuning_copies_start_from_the_multitask_student_and_train_apart(tokenizer, tmp_path):
    """MKD sec. 6.2 fine-tuning: every task's copy starts as the multi-task student; a step on one task
    changes only that task's copy."""
    spec = cmow_spec(per_task=True)
    torch.manual_seed(5)
    multitask = build_student_model("cmow", tasks=TASKS, vocab_size=len(tokenizer), **SMALL["cmow"])
    save_train_state(tmp_path, multitask, torch.optim.AdamW(multitask.parameters()), {"epoch": 3})
    trainee = PerTaskCopiesTrainee(spec)
    trainee.start_from(tmp_path)
    want = multitask.state_dict()
    for task in TASKS:
        for name, value in trainee.model[task].state_dict().items():
            assert torch.equal(value, want[name]), (task, name)
    feats = trainee.collate(trainee.features("para", TEXTS, PAIRS, 16))
    loss = trainee.forward("para", feats, [0, 1, 2]).pow(2).mean()
    loss.backward()
    # Each copy keeps CMOW's three vocabulary tables (forward, backward matrices, CBOW) on sparse gradients.
    tables = [p for p in trainee.model["para"].parameters() if getattr(p, "_kdlib_sparse", False)]
    assert len(tables) == 3 and all(p.grad.is_sparse for p in tables)
    touched = {id(p) for p in trainee.model.parameters() if p.grad is not None}
    assert touched and touched <= {id(p) for p in trainee.task_parameters("para")}
    assert trainee.shared_parameters() == []


def test_load_weights_refuses_a_checkpoint_without_the_trainable_parameters(tokenizer, tmp_path):
    a = build_student_model("cmow", tasks={"sent": TASKS["sent"]}, vocab_size=len(tokenizer), **SMALL["cmow"])
    save_train_state(tmp_path, a, torch.optim.AdamW(a.parameters()), {})
    b = build_student_model("cmow", tasks=TASKS, vocab_size=len(tokenizer), **SMALL["cmow"])
    with pytest.raises(ValueError, match="no weights for .*heads.para"):
        load_weights(tmp_path, b)
    assert json.loads((tmp_path / "train_state.json").read_text()) == {}


@pytest.mark.parametrize("per_task", [False, True])
def test_the_dev_score_of_an_end_to_end_student_is_its_predictions_score(tokenizer, per_task):
    """kdlib.dev_scoring on token features, in two workers' shares, equals scoring predict_student's outputs
    (a binned head's expected score included)."""
    from kdlib.dev_scoring import DevRows, dev_features, dev_metrics, dev_outputs
    from kdlib.metrics import task_metrics

    spec = cmow_spec(per_task=per_task)
    trainee = make_trainee(spec)
    labels = {"sent": [1, 0, 1, 0], "para": [1, 0, 0, 1], "sim": [4.0, 0.5, 3.0, 4.5], "binned": [4.0, 0.5, 3.0, 4.5]}
    metrics = {"sent": "accuracy", "para": "f1", "sim": "pearson", "binned": "spearman"}
    dev = {t: DevRows(TEXTS, [None] * 4 if t == "sent" else PAIRS, [float(v) for v in labels[t]], metrics[t])
           for t in TASKS}
    shares = [dev_outputs(trainee, spec.tasks, dev_features(dev, trainee, rank=r, world=2, max_length=16))
              for r in range(2)]
    assert [len(s["para"]) for s in shares] == [2, 2]
    got = dev_metrics({t: np.concatenate([s[t] for s in shares]) for t in TASKS}, dev, spec.tasks)
    for t in TASKS:
        model = trainee.model[t] if per_task else trainee.model
        out = predict_student(model, tokenizer, TEXTS, None if t == "sent" else PAIRS, [t], max_length=16)[t]
        # float32 outputs of batches padded otherwise: equal to rounding
        assert got[f"dev/{t}"] == pytest.approx(task_metrics(TASKS[t].kind, out, np.array(labels[t]))[metrics[t]],
                                                rel=1e-5, abs=1e-6)
