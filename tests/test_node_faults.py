"""A worker node dies on a multi-node Ray cluster (ray.cluster_utils.Cluster: a head and 2 worker nodes on
this machine): labeling loses or duplicates no example, distillation resumes from its last checkpoint.

Each scenario runs in its own driver process (tests/cluster_faults_scenario.py): this pytest session already
runs a Ray (conftest), and a driver joins one cluster at a time. The scenario removes, without a graceful
shutdown, a worker node that hosts a labeling actor or a Ray Train worker (found with the State API) once the
stage has made progress, and writes what happened to result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).resolve().parent / "cluster_faults_scenario.py"
pytestmark = pytest.mark.slow


def run_scenario(name: str, tmp_path: Path) -> dict:
    workdir = tmp_path / name
    log = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, never another one
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(SCENARIO), name, str(workdir)], check=False, cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0 or not (workdir / "result.json").exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if "[state-dump]" not in line]
        pytest.fail(f"scenario {name} exited {proc.returncode}; log {log}:\n" + "\n".join(lines[-80:]))
    return json.loads((workdir / "result.json").read_text())


def check_removal(result: dict, actor_class: str) -> dict:
    """The node removed was a worker node, and it hosted live work of the stage when it went."""
    removal = result["removal"]
    assert removal["removed"] and "error" not in removal, removal
    assert removal["node_id"] in result["nodes"]["workers"] and removal["node_id"] != result["nodes"]["head"]
    assert removal["actors_on_node"], "the removed node hosted no actor of the stage: nothing was tested"
    assert all(actor_class in a["class_name"] and a["state"] == "ALIVE" for a in removal["actors_on_node"])
    return removal


def test_worker_node_lost_while_labeling_loses_and_duplicates_nothing(tmp_path):
    """2 labeling actors, one on each worker node; the node of one dies after the first shards are committed.
    Ray restarts the lost actor on the surviving node and Ray Data retries its task: every shard is committed
    once, every planned example is in the store exactly once."""
    result = run_scenario("labeling", tmp_path)
    removal = check_removal(result, "ShardLabeler")
    planned = result["planned_shards"]
    # Removed mid-run: some shards committed, most still to label.
    assert 1 <= removal["context"]["commit_records"] < planned // 2, removal
    # Work was spread: each worker node hosted a labeling actor (the head has no CPUs).
    assert all(n == 1 for n in removal["alive_before"].values()), removal["alive_before"]
    assert removal["head_actors"] == 0
    # The lost actor came back on the surviving worker node.
    survivor = next(w for w in result["nodes"]["workers"] if w != removal["node_id"])
    lost = {a["actor_id"] for a in removal["actors_on_node"]}
    final = {a["actor_id"]: a for a in result["actors"]}
    assert all(final[a]["node_id"] == survivor for a in lost), (lost, result["actors"])

    stats = result["stats"]
    assert stats["planned"] == planned and stats["already_committed"] == 0
    assert stats["labeled"] + stats["read_back"] == planned, stats  # each shard's summary arrived once
    assert sum(s["rows"] for s in result["store"].values()) == stats["rows"] == 3900
    for task, s in result["store"].items():
        assert s["rows"] == s["unique"] == s["planned"], (task, s)
        assert s["missing"] == s["foreign"] == s["duplicates"] == 0, (task, s)
        assert s["commit_records"] == s["planned_shards"], (task, s)


def test_worker_node_lost_during_distillation_resumes_from_last_checkpoint(tmp_path):
    """2 Ray Train workers (1 CPU each on 1-CPU nodes, so on 2 nodes); the worker node of one dies after the
    first epoch checkpoint is registered. FailureConfig restarts the worker group on the head and the surviving
    worker node, from that checkpoint (not from epoch 0), and the run finishes every epoch."""
    result = run_scenario("distill", tmp_path)
    removal = check_removal(result, "RayTrainWorker")
    epochs, state = result["epochs"], result["train_state"]
    registered = removal["context"]["checkpoint_epoch"]
    assert registered >= 1
    # The first worker group spanned 2 nodes.
    assert sum(removal["alive_before"].values()) + removal["head_actors"] == 2, removal
    # Finished every epoch after exactly one restart, which started from the last registered checkpoint
    # (or a later one the controller registered before it saw the failure), and before the end.
    assert state["epoch"] == epochs, state
    assert state["starts"][0] == 0 and len(state["starts"]) == 2, state
    assert registered <= state["starts"][1] < epochs, (state, registered)
    # The restarted group: 2 new workers, on the head and the surviving worker node.
    restarted = [a for a in result["actors"] if a["actor_id"] not in removal["alive_ids"]]
    survivor = next(w for w in result["nodes"]["workers"] if w != removal["node_id"])
    assert sorted(a["node_id"] for a in restarted) == sorted([result["nodes"]["head"], survivor]), restarted
    # The restarted workers saw every training row of the store once and stayed identical replicas.
    report = result["train_report"]
    assert {t: s["rows"] for t, s in result["store_train"].items()} == \
        {"sentiment": 300, "paraphrase": 100, "similarity": 100}  # 100 rows each; sentiment + 2 masked copies
    for task, s in result["store_train"].items():
        assert report[f"rows/{task}"] == s["rows"] and report[f"duplicates/{task}"] == 0, report
        assert report[f"ids/{task}"] == s["ids"], report
    assert report["replicas/identical"], report
    assert result["students"] == ["paraphrase", "sentiment", "similarity"]
