"""`ray start --head` then `ray job submit --working-dir . -- python jobs/distill.py`, as README shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
GCS_PORT, DASHBOARD_PORT, AGENT_PORT = 6399, 8299, 52399


@pytest.fixture
def head_node(tmp_path):
    """A real head node on loopback with the dashboard (Jobs API); stopped with its processes afterwards."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    log = open(tmp_path / "head.log", "w")
    # --block keeps the head in the foreground so that terminating it stops exactly its processes,
    # leaving any other Ray on this machine (the test session's) alone.
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={GCS_PORT}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={DASHBOARD_PORT}", f"--dashboard-agent-listen-port={AGENT_PORT}",
                             "--num-cpus=2", "--include-dashboard=true"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            break
        except OSError:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(1)
    else:
        pytest.fail("head node's dashboard did not come up:\n" + (tmp_path / "head.log").read_text())
    yield ray_bin, address
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    log.close()


def test_submitted_job_runs_the_pipeline(head_node, tmp_path):
    ray_bin, address = head_node
    store = tmp_path / "store"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # local clusters start with token auth on
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "jobs/distill.py", *tiny_run_overrides(store), "distill.epochs=1", "run_name=submitted"]
    for _ in range(12):  # the job agent may come up a little after the dashboard answers
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        out = done.stdout + done.stderr
        if "No available agent" not in out:
            break
        time.sleep(5)
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and "| sentiment | accuracy |" in out
    results = json.loads((store / "submitted" / "results.json").read_text())
    assert set(results["scores"]) == {"sentiment", "paraphrase", "similarity"}
    assert (Path(results["model_dir"]) / "weights.safetensors").exists()
