"""Encoder families beyond BERT (kdlib.families): the branched model, kdlib's own teachers, the small transformer,
the merged model and its server on tiny random BERT, RoBERTa, ELECTRA (with its embedding projection),
DistilBERT and DeBERTa-v2 (v3-style relative attention) encoders with real tokenizers built offline, against
the encoders' own transformers forward."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_run_overrides
from kdlib.artifact import load_model, save_model
from kdlib.branched import BranchedModel, BranchSpec
from kdlib.encoder import load_encoder, load_tokenizer
from kdlib.errors import ConfigError
from kdlib.predict import predict
from kdlib.serve.model import Job, ServedModel
from kdlib.students.heads import TaskHead
from kdlib.students.inputs import make_student_inputs
from kdlib.students.registry import build_student_model
from kdlib.teachers import train_ensemble
from tiny_checkpoints import tiny_encoder

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"bert": {}, "roberta": {}, "electra": {"embedding_size": 16}, "distilbert": {},
            # DeBERTa-v3 style: relative attention over position buckets, no absolute positions
            "deberta-v2": {"relative_attention": True, "position_buckets": 16, "norm_rel_ebd": "layer_norm",
                           "pos_att_type": ["p2c", "c2p"], "position_biased_input": False}}
TEXTS = ["a good movie", "boring and far too long in every single way", "the plot", "an utterly charming delight"]
PAIRS = ["a bad film", "the best film of the year", "thin", "not worth the time"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def encoder_dir(request, tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp(request.param) / "encoder", request.param, **FAMILIES[request.param])


def inputs(folder: Path, pairs=PAIRS) -> dict[str, torch.Tensor]:
    enc = load_tokenizer(str(folder))(TEXTS, pairs, truncation=True, max_length=32, padding=True,
                                      return_tensors="pt", return_token_type_ids=True)
    return dict(enc)


@torch.no_grad()
def test_the_cut_model_reproduces_the_encoders_own_forward(encoder_dir):
    """Trunk of depth 1 plus a 3-layer branch = the whole 4-layer encoder: its states are transformers' own."""
    encoder = load_encoder(str(encoder_dir))
    model = BranchedModel.from_encoder(encoder, [BranchSpec("t", "classification", 2, 1, 3)]).eval()
    enc = inputs(encoder_dir)
    types = {} if encoder.config.model_type == "distilbert" else {"token_type_ids": enc["token_type_ids"]}
    expected = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **types).last_hidden_state
    full = model.trunk_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], depth=1)
    for layer in model.branches["t"].layers:
        full = model.run_layer(layer, full, model.context(full, enc["attention_mask"]))
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(full[real], expected[real], atol=1e-5, rtol=1e-5)


def test_kdlibs_teachers_train_save_and_load_on_the_family(encoder_dir, tmp_path):
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"text": [TEXTS[i % 4] for i in range(32)], "text_pair": [PAIRS[i % 4] for i in range(32)],
                          "label": rng.integers(0, 2, 32)})
    train_ensemble(task="t", kind="classification", label_names=["a", "b"], metric="accuracy", train=train,
                   encoder_source=str(encoder_dir), random_init=False, config_overrides={}, pooling="mean",
                   max_length=32, fine_tune_layers=2, members=2, epochs=1, batch_size=8, lr=1e-3, head_lr=1e-2,
                   weight_decay=0.0, seed=0, out_dir=str(tmp_path / "ensemble"), log=lambda line: None)
    encoder = load_encoder(str(encoder_dir))
    ensemble, manifest = load_model(tmp_path / "ensemble", encoder=encoder)
    assert manifest["encoder_config"]["model_type"] == encoder.config.model_type
    enc = inputs(encoder_dir)
    with torch.no_grad():
        out = ensemble(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        states = ensemble.trunk_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], depth=2)
        for name in ("t__m0", "t__m1"):  # the shared trunk once, then each branch = each member alone
            torch.testing.assert_close(ensemble.branch_forward(name, states, enc["attention_mask"]), out[name])
    assert (out["t__m0"] - out["t__m1"]).abs().max() > 1e-4
    # a full artifact (trunk included) loads without the encoder and answers the same
    save_model(ensemble, tmp_path / "full", include_trunk=True)
    again, _ = load_model(tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(again(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])["t__m0"],
                                   out["t__m0"])


@torch.no_grad()
def test_small_transformer_copies_the_familys_first_layers(encoder_dir):
    encoder = load_encoder(str(encoder_dir))
    student = build_student_model("small_transformer", tasks={"t": TaskHead("classification", 2, pair=True)},
                                  vocab_size=encoder.config.vocab_size, encoder=encoder, num_layers=2).eval()
    batch = make_student_inputs(load_tokenizer(str(encoder_dir)), TEXTS, PAIRS, max_length=32)
    types = {} if encoder.config.model_type == "distilbert" else {"token_type_ids": batch.token_type_ids}
    hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                     **types).hidden_states
    torch.testing.assert_close(student.encode(batch), (hidden[1][:, 0] + hidden[2][:, 0]) / 2, atol=1e-5, rtol=1e-5)


def test_a_merged_model_of_the_family_serves_as_predict_says(encoder_dir, tmp_path):
    encoder = load_encoder(str(encoder_dir))
    merged = BranchedModel.from_encoder(encoder, [BranchSpec("a", "classification", 2, 2, 1),
                                                  BranchSpec("b", "regression", 1, 1, 2)]).eval()
    enc = {"name": "tiny", "source": str(encoder_dir), "fingerprint": "x"}
    save_model(merged, tmp_path / "model", extra={"role": "merged", "encoder": enc, "max_length": 32},
               tasks={"a": {"kind": "classification", "label_names": ["n", "y"], "pair": False},
                      "b": {"kind": "regression", "pair": True}})
    served = ServedModel.load(tmp_path / "model")
    [answers] = served.infer([Job(TEXTS, PAIRS, ("a", "b"))])
    tokenizer = load_tokenizer(str(encoder_dir))
    a = predict(merged, tokenizer, TEXTS, None, ["a"], max_length=32)["a"]
    b = predict(merged, tokenizer, TEXTS, PAIRS, ["b"], max_length=32)["b"]
    probs = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    np.testing.assert_allclose([[x["a"]["probabilities"]["n"], x["a"]["probabilities"]["y"]] for x in answers], probs,
                               atol=1e-5)
    np.testing.assert_allclose([x["b"]["score"] for x in answers], b[:, 0], atol=1e-5)


def test_a_deberta_v2_with_a_convolution_is_refused_naming_it(tmp_path):
    """deberta-v2-xlarge's convolution after the first layer mixes the embeddings in: not cut, and the error says
    so (DeBERTa-v3 has none)."""
    folder = tiny_encoder(tmp_path / "deberta", "deberta-v2", conv_kernel_size=3)
    with pytest.raises(ConfigError, match=r"convolution after its first layer \(conv_kernel_size > 0"):
        BranchedModel.from_encoder(load_encoder(str(folder)), [BranchSpec("t", "classification", 2, 1, 1)])


@pytest.mark.slow
def test_the_job_runs_end_to_end_on_a_roberta_encoder(ray_session, tmp_path):
    """jobs/distill.py with encoder.path a RoBERTa (byte-level BPE): kdlib's teachers, labeling, the branched
    student, the merge and evaluation all run on it."""
    folder = tiny_encoder(tmp_path / "roberta", "roberta")
    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    overrides = tiny_run_overrides(tmp_path / "store") + [
        f"encoder.path={folder}", "encoder.random_init=false", "encoder.config_overrides={}",
        "distill.num_workers=1", "distill.epochs=1", "tasks.sentiment.augment.copies=0",
        *(f"tasks.{t}.max_train_examples=60" for t in ("sentiment", "paraphrase", "similarity"))]
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    results = json.loads((tmp_path / "store" / "demo" / "results.json").read_text())
    assert results["layers"]["encoder"] == 4
    assert all(np.isfinite(s["primary"]["student"]) and len(s["primary"]["members"]) == 2
               for s in results["scores"].values())
    merged, manifest = load_model(results["model_dir"])
    assert manifest["encoder_config"]["model_type"] == "roberta" and merged.family.name == "roberta"
