import json
from pathlib import Path

import torch

from kdlib.stages import StageCache, fingerprint
from kdlib.train_state import load_train_state, save_train_state


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_stage_runs_once_and_an_interrupted_stage_reruns(tmp_path):
    cache, runs = StageCache(tmp_path), []

    def work(out):
        runs.append(out)
        (out / "x.txt").write_text("ok")

    first = Path(cache.run("s", "fp1", work, log=lambda *_: None))
    second = Path(cache.run("s", "fp1", work, log=lambda *_: None))
    assert first == second and len(runs) == 1 and [r.cached for r in cache.records] == [False, True]
    # A crash before the marker leaves a folder that does not count and is cleared.
    out, done = cache.begin("s", "fp2")
    Path(out).mkdir(parents=True)
    (Path(out) / "partial").write_text("half")
    out, done = cache.begin("s", "fp2")
    assert not done and not (Path(out) / "partial").exists()
    assert json.loads((first / "_DONE.json").read_text())["fingerprint"] == "fp1"


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
