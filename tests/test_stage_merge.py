"""kdlib.pipeline.merge: the branched students on one trunk give each student's own outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdlib.artifact import load_model, read_manifest
from kdlib.merge import overhead
from kdlib.pipeline import RunContext, merge_students
from kdlib.predict import predict

TEXTS, PAIRS = ["a fine film", "not good at all", "ok"], ["it was fine", "bad", "fine"]


def test_the_merged_model_answers_as_each_student_does(tiny_pipeline):
    p = tiny_pipeline
    merged, manifest = load_model(p.model_dir)
    encoder, tok = p.ctx.encoder.load(), p.ctx.encoder.tokenizer()
    for name in p.tasks:
        student, _ = load_model(Path(p.students.dir) / name, encoder=encoder)
        pairs = None if name == "sentiment" else PAIRS
        a = predict(merged, tok, TEXTS, pairs, [name], max_length=32)[name]
        b = predict(student, tok, TEXTS, pairs, [name], max_length=32)[name]
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the trunk runs up to the deepest branch point once: the tiny encoder's 4 layers, L = 2, 3, 2
    assert manifest["role"] == "merged" and manifest["trunk_depth"] == 2
    # which tasks take a sentence pair (their config's text_pair_column): the server requires or refuses text_pair
    assert {t: f["pair"] for t, f in manifest["tasks"].items()} == {
        "sentiment": False, "paraphrase": True, "similarity": True}
    assert {b["name"]: (b["depth"], b["layers"]) for b in manifest["branches"]} == {
        "sentiment": (2, 2), "paraphrase": (1, 2), "similarity": (2, 1)}
    assert p.results.overhead == overhead([(2, 2), (1, 2), (2, 1)], 4)


def test_a_rerun_reuses_the_merged_model(tiny_pipeline):
    p = tiny_pipeline
    ctx = RunContext.create(p.cfg, log=lambda *_: None)
    assert merge_students(ctx, p.tasks, p.students) == p.model_dir
    assert [r.cached for r in ctx.cache.records] == [True]
    assert read_manifest(p.model_dir)["encoder"] == p.ctx.encoder.manifest()
