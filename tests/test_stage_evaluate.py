"""kdlib.pipeline.evaluate: the scores in results.json against a hand computation from the store and the
model's own predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdlib.artifact import load_model
from kdlib.metrics import task_metrics
from kdlib.pipeline import write_results
from kdlib.predict import predict
from kdlib.soft_targets import teacher_logits_array


def test_scores_equal_a_hand_computation(tiny_pipeline):
    p = tiny_pipeline
    merged, _ = load_model(p.model_dir)
    tok = p.ctx.encoder.tokenizer()
    for name, data in p.tasks.items():
        dev = p.labels.stores[name].read(split="dev")
        labels, logits = dev["label"].to_numpy(), teacher_logits_array(dev)  # (N,), (N, K, C)
        pairs = dev["text_pair"].tolist() if name != "sentiment" else None
        out = predict(merged, tok, dev["text"].tolist(), pairs, [name], max_length=32)[name]
        score = p.results.scores[name]
        primary = score["primary"]
        assert primary["student"] == pytest.approx(task_metrics(data.kind, out, labels)[data.metric], abs=1e-9)
        members = [task_metrics(data.kind, logits[:, k], labels)[data.metric] for k in range(logits.shape[1])]
        assert primary["members"] == pytest.approx(members)
        # the ensemble: mean of the members' logits (classification) or predictions (regression)
        ensemble = task_metrics(data.kind, logits.mean(1), labels)[data.metric]
        assert primary["ensemble"] == pytest.approx(ensemble)
        if ensemble > 0:
            assert primary["retained_pct"] == pytest.approx(100 * primary["student"] / ensemble)


def test_results_files_hold_the_scores_and_the_stages(tiny_pipeline):
    p = tiny_pipeline
    write_results(p.ctx, p.results)
    saved = json.loads((p.root / "stages" / "results.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(p.results.scores))
    assert saved["student"] == "branched" and saved["layers"]["encoder"] == 4 and "parameters" not in saved
    assert [s["name"] for s in saved["stages"]] == ["teachers"] * 3 + ["labels"] * 3 + ["distill", "merge"]
    md = (p.root / "stages" / "results.md").read_text()
    assert "| sentiment | accuracy |" in md and "## Stages" in md and "| distill |" in md
    # each task's sanity baseline, in results.json and as the table's baseline column
    assert set(saved["baselines"]) == set(p.tasks) and saved["warnings"] == p.results.warnings
    base = saved["baselines"]["paraphrase"]
    assert f"| paraphrase | f1 | {base['score']:.2f} |" in md
    assert np.isfinite(saved["overhead"])
