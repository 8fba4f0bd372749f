import json
import os
import re
from pathlib import Path

import torch

from kdlib.stages import RESUMABLE, StageCache, fingerprint
from kdlib.train_state import load_train_state, save_train_state


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_stage_runs_once_and_an_interrupted_stage_reruns(tmp_path):
    lines, runs = [], []
    cache = StageCache(tmp_path, log=lines.append)

    def work(out):
        runs.append(out)
        (out / "x.txt").write_text("ok")
        return {"where": "192.0.2.7 (2 train workers)"}

    first = Path(cache.run("s", "fp1", work))
    second = Path(cache.run("s", "fp1", work))
    assert first == second and len(runs) == 1 and [r.cached for r in cache.records] == [False, True]
    # One line as the stage starts, one as it ends (how long, where), one when a later run reuses it.
    assert lines[0] == f"[s] running -> {first}" and lines[2] == f"[s] inputs unchanged, reusing {first}"
    assert re.fullmatch(r"\[s\] done in \d+\.\ds on 192\.0\.2\.7 \(2 train workers\)", lines[1]) and len(lines) == 3
    # A crash before the marker leaves a folder that does not count and is cleared.
    out, done = cache.begin("s", "fp2")
    Path(out).mkdir(parents=True)
    (Path(out) / "partial").write_text("half")
    out, done = cache.begin("s", "fp2")
    assert not done and not (Path(out) / "partial").exists()
    assert json.loads((first / "_DONE.json").read_text())["fingerprint"] == "fp1"


def test_an_unfinished_stage_keeps_only_what_it_resumes_from(tmp_path):
    """Ray Train's checkpoints survive an interrupted attempt (the next resumes from them); its other outputs
    do not."""
    cache = StageCache(tmp_path, log=lambda *_: None)
    out, _ = cache.begin("distill", "fp")
    checkpoint = Path(out) / RESUMABLE / "distill" / "checkpoint_1" / "state.bin"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    (Path(out) / "students").mkdir()
    (Path(out) / "train_report.json").write_text("{}")
    out, done = cache.begin("distill", "fp")
    assert not done and os.listdir(out) == [RESUMABLE] and checkpoint.read_bytes() == b"weights"


def test_train_state_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_train_state(tmp_path, model, opt, {"epoch": 3, "step": 12})
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    fresh[0].weight.requires_grad_(False)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    assert load_train_state(tmp_path, fresh, fresh_opt) == {"epoch": 3, "step": 12}
    torch.testing.assert_close(fresh[1].weight, model[1].weight)
    state = fresh_opt.state[fresh[1].weight]
    torch.testing.assert_close(state["exp_avg"], opt.state[model[1].weight]["exp_avg"])
    # Only trainable parameters are stored: the frozen one keeps its own values.
    assert not torch.equal(fresh[0].weight, model[0].weight)
