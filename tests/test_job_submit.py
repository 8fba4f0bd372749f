"""`ray start --head` then `ray job submit --working-dir . -- python jobs/<job>.py`, as README shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from conftest import tiny_run_overrides
from kdlib.cluster import local_head, submit_job

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
GCS_PORT, DASHBOARD_PORT, AGENT_PORT, SERVE_PORT = 6399, 8299, 52399, 8399


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real head node on loopback with the dashboard (Jobs API); stopped with its processes afterwards."""
    log = tmp_path_factory.mktemp("head") / "head.log"
    with local_head(log, port=GCS_PORT, dashboard_port=DASHBOARD_PORT, agent_port=AGENT_PORT) as address:
        yield address


def test_submitted_job_runs_the_pipeline(head_node, tmp_path):
    store = tmp_path / "store"
    done = submit_job(head_node, ["python", "jobs/distill.py", *tiny_run_overrides(store), "distill.epochs=1",
                                  "run_name=submitted"], ROOT, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and "| sentiment | accuracy |" in out
    results = json.loads((store / "submitted" / "results.json").read_text())
    assert set(results["scores"]) == {"sentiment", "paraphrase", "similarity"}
    assert (Path(results["model_dir"]) / "weights.safetensors").exists()

    # jobs/serve.py submitted the same way deploys the run's model on the cluster and returns; the
    # application keeps answering over HTTP after the job has ended.
    done = submit_job(head_node, ["python", "jobs/serve.py", "--model", str(store / "submitted"),
                                  "--port", str(SERVE_PORT), "--num-cpus", "0.25"], ROOT, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    try:
        r = requests.post(f"http://127.0.0.1:{SERVE_PORT}/v1/predict", timeout=60,
                          json={"tasks": ["sentiment", "similarity"],
                                "inputs": [{"text": "a fine film", "text_pair": "a good movie"}]})
        assert r.status_code == 200, r.text
        answer = r.json()["results"][0]
        assert answer["sentiment"]["label"] in ("negative", "positive") and "score" in answer["similarity"]
        tasks = requests.get(f"http://127.0.0.1:{SERVE_PORT}/v1/tasks", timeout=30).json()
        assert tasks["model_dir"] == results["model_dir"]
    finally:  # free the CPUs for the next test
        submit_job(head_node, ["python", "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()"],
                   ROOT, timeout=300)


def test_submitted_depth_search_runs(head_node, tmp_path):
    """jobs/tune_depth.py under `ray job submit` too: Ray Tune trials on the head's CPUs, merged model saved."""
    from test_tune import tiny_config, tiny_overrides

    root = tmp_path / "tune"
    root.mkdir()
    done = submit_job(head_node, ["python", "jobs/tune_depth.py", tiny_config(root, ("sentiment",)),
                                  *tiny_overrides(root, ("sentiment",)), "search.num_samples=2"], ROOT, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    results = json.loads(next(root.glob("*/tune/results.json")).read_text())
    assert results["trials"] >= 2 and (Path(results["model_dir"]) / "weights.safetensors").exists()
