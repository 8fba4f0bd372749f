"""One node-fault scenario on a multi-node Ray cluster simulated on this machine; run by tests/test_node_faults.py.

    python tests/cluster_faults_scenario.py labeling WORKDIR   # a worker node dies while labeling
    python tests/cluster_faults_scenario.py distill WORKDIR    # a worker node dies during Ray Train distillation

Starts `ray.cluster_utils.Cluster` (a head and 2 worker nodes, each its own raylet and object store), runs the
stage with the real kdlib code (jobs/distill.py's stage functions, tiny random encoder, demo data), and from a
background thread removes, without a graceful shutdown, a worker node that hosts a labeling actor or a Ray
Train worker (found with the State API) once the stage has made progress: the first shard committed to the
store, or the first epoch checkpoint registered by Ray Train. Writes WORKDIR/result.json with what happened;
the test asserts on it. A `Cluster` needs its own driver process: the pytest session already runs a Ray.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
import ray.data
import torch
from conftest import tiny_run_overrides
from ray.cluster_utils import Cluster

from kdlib.artifact import save_model
from kdlib.branched import BranchedModel, BranchSpec, member_name
from kdlib.cluster import simulated_cluster
from kdlib.config import load_run_config
from kdlib.encoder import load_encoder
from kdlib.labeling import ShardLabeler, run_labeling, shard_rows
from kdlib.pipeline import RunContext, Teachers, distill_students, load_data, plan_labels
from kdlib.pipeline.labels import finish_labels, labeling_settings
from kdlib.soft_targets import ids_digest

LABELER = "ShardLabeler"  # Ray Data names its actor class MapWorker(MapBatches(ShardLabeler))
TRAIN_WORKER = "RayTrainWorker"

T0 = time.perf_counter()
TIMELINE: dict[str, float] = {}  # seconds since start of each milestone, for the result file


def say(milestone: str, msg: str = "") -> None:
    TIMELINE[milestone] = round(time.perf_counter() - T0, 1)
    print(f"[scenario +{TIMELINE[milestone]}s] {milestone} {msg}", flush=True)


# Node layouts (logical CPUs: 3 raylets share the machine's 2 cores).
# labeling: the head takes no work, so both labeling actors (0.5 CPU each) run on the worker nodes; after
# the removal the surviving node (1 CPU) holds both restarted actors.
# distill: 1 CPU per node and 1 per Ray Train worker, so the 2 workers cannot share a node: the worker
# group spans 2 nodes, and after one worker node is gone the head and the other worker node still fit it.
LAYOUTS = {"labeling": {"head": 0, "workers": [1, 1]}, "distill": {"head": 1, "workers": [1, 1]}}
# A node killed without a goodbye is declared dead after ~3 s of failed health checks instead of ~15 s.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def cluster_for(scenario: str):
    layout = LAYOUTS[scenario]
    return simulated_cluster(layout["head"], layout["workers"], system_config=FAST_HEALTH_CHECKS)


def describe(cluster: Cluster, workers: list, scenario: str) -> dict:
    layout = LAYOUTS[scenario]
    say("cluster_up", f"head {cluster.head_node.node_id[:8]} ({layout['head']} CPU), workers "
        + ", ".join(f"{w.node_id[:8]} ({n} CPU)" for w, n in zip(workers, layout["workers"])))
    return {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}


def actors(class_part: str) -> list[dict]:
    """Every actor (alive or dead) of this cluster whose class name contains `class_part`: id, node, pid, state."""
    from ray.util.state import list_actors

    # The address explicitly: with another Ray running on this machine, "auto" may pick that one.
    return [{"actor_id": a.actor_id, "node_id": a.node_id, "pid": a.pid, "state": a.state,
             "class_name": a.class_name}
            for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, timeout=30,
                                 raise_on_missing_output=False)
            if class_part in (a.class_name or "")]


class NodeKiller:
    """Background thread: once `ready()` is true, remove (kill) a worker node that hosts an ALIVE actor of
    `class_part`. `record` keeps what it saw and did, for the result file."""

    def __init__(self, cluster: Cluster, workers: list, class_part: str, ready, *, context=None,
                 min_alive: int = 1, timeout: float = 240):
        self.cluster, self.workers, self.class_part, self.ready = cluster, workers, class_part, ready
        self.min_alive = min_alive
        self.context = context or dict
        self.timeout = timeout
        self.record: dict = {"removed": False}
        self.thread = threading.Thread(target=self._run, daemon=True, name="node-killer")

    def start(self) -> NodeKiller:
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline, triggered = time.time() + self.timeout, None
        try:
            while time.time() < deadline:
                if triggered or self.ready():
                    triggered = triggered or time.time()
                    alive = [a for a in actors(self.class_part) if a["state"] == "ALIVE"]
                    by_node = {w.node_id: [a for a in alive if a["node_id"] == w.node_id] for w in self.workers}
                    hosting = [w for w in self.workers if by_node[w.node_id]]
                    # Wait (up to 5 s) for all actors to be up, so that some keep working through the loss.
                    if hosting and (len(alive) >= self.min_alive or time.time() - triggered > 5):
                        # Prefer a node whose loss leaves live work elsewhere (the other node also hosts some).
                        victim = min(hosting, key=lambda w: len(by_node[w.node_id]))
                        context = self.context()
                        started = time.time()
                        say("removing_node", f"{victim.node_id[:8]} hosting {len(by_node[victim.node_id])} "
                            f"{self.class_part} actor(s); {context}")
                        self.cluster.remove_node(victim, allow_graceful=False)
                        say("node_removed")
                        self.record.update(
                            removed=True, at=started, seconds=round(time.time() - started, 2),
                            node_id=victim.node_id, actors_on_node=by_node[victim.node_id],
                            alive_before={nid: len(a) for nid, a in by_node.items()},
                            alive_ids=[a["actor_id"] for a in alive],
                            head_actors=len([a for a in alive if a["node_id"] == self.cluster.head_node.node_id]),
                            context=context)
                        return
                time.sleep(0.1)
            self.record["error"] = "timed out waiting for the trigger or for an actor on a worker node"
        except Exception:  # noqa: BLE001 (reported in the result; the test fails on it)
            self.record["error"] = traceback.format_exc()


def tiny_teachers(cfg, tasks, source: str, root: Path) -> dict[str, str]:
    """K perturbed random members per task at the config's fine-tuning depth, saved as teacher artifacts
    (what jobs/distill.py's teachers stage writes, without spending the time to train them)."""
    encoder = load_encoder(source, True, cfg.encoder.config_overrides, seed=cfg.seed)
    n_layers = encoder.config.num_hidden_layers
    dirs = {}
    for t, (name, data) in enumerate(tasks.items()):
        L = cfg.tasks[name].fine_tune_layers
        specs = [BranchSpec(member_name(name, k), data.kind, data.num_outputs, n_layers - L, L)
                 for k in range(cfg.teachers.members)]
        model = BranchedModel.from_encoder(encoder, specs, cfg.encoder.pooling, seed=cfg.seed)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith("branches."):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        out = root / "teachers" / f"random-{name}" / "ensemble"
        save_model(model.eval(), out, include_trunk=False,
                   tasks={name: {"kind": data.kind, "label_names": data.label_names, "metric": data.metric}},
                   extra={"role": "teacher_ensemble", "task": name, "fine_tune_layers": L,
                          "members": cfg.teachers.members})
        dirs[name] = str(out)
    return dirs


def setup(workdir: Path, overrides: list[str]):
    root = workdir / "store"
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", tiny_run_overrides(root) + overrides)
    ctx = RunContext.create(cfg)
    tasks = load_data(ctx)
    teachers = Teachers(tiny_teachers(cfg, tasks, ctx.encoder.source, workdir))
    labels = plan_labels(ctx, tasks, teachers)
    say("setup_done", f"{len(labels.plan)} shards planned")
    return ctx, tasks, teachers, labels, root


def commit_files(stores) -> list[str]:
    return [p for s in stores.values() for p in glob.glob(os.path.join(s.shards_dir, "*.json"))]


def check_store(stores, plan) -> dict:
    """Per task: rows in the finished store against the planned ids (missing, duplicated, foreign)."""
    out = {}
    for task, store in stores.items():
        planned = [i for s, ex in plan if s.task == task for i in ex["id"]]
        rows = store.read()
        ids = rows["id"].tolist()
        out[task] = {"planned": len(planned), "rows": len(ids), "unique": len(set(ids)),
                     "missing": len(set(planned) - set(ids)), "foreign": len(set(ids) - set(planned)),
                     "duplicates": len(ids) - len(set(ids)),
                     "commit_records": len(glob.glob(os.path.join(store.shards_dir, "*.json"))),
                     "planned_shards": sum(1 for s, _ in plan if s.task == task)}
    return out


def labeling(workdir: Path) -> dict:
    """All 3 demo tasks in full (3,900 examples, 2 masked copies of each sentiment training example) in shards
    of 10, labeled by 2 Ray Data actors; a worker node hosting one of them dies after the first commit."""
    ctx, _, teachers, labels, root = setup(workdir, [
        *(f"tasks.{t}.max_train_examples=600" for t in ("sentiment", "paraphrase", "similarity")),
        "labeling.shard_size=10", "labeling.num_actors=2", "labeling.cpus_per_actor=0.5",
        "labeling.torch_threads=1"])
    cfg, stores, plan = ctx.cfg, labels.stores, labels.plan
    result = {"planned_shards": len(plan)}

    def commits() -> dict:
        return {"commit_records": len(commit_files(stores))}

    with cluster_for("labeling") as (cluster, workers):
        result["nodes"] = describe(cluster, workers, "labeling")
        killer = NodeKiller(cluster, workers, LABELER, lambda: bool(commit_files(stores)), context=commits,
                            min_alive=cfg.labeling.num_actors).start()
        started = time.perf_counter()
        stats = run_labeling(plan, stores=stores, progress_seconds=2,
                             **labeling_settings(ctx, teachers))
        result["labeling_seconds"] = round(time.perf_counter() - started, 2)
        say("labeling_done")
        killer.thread.join(timeout=30)
        result["stats"] = stats
        result["removal"] = killer.record
        result["actors"] = actors(LABELER)
    finish_labels(ctx, labels, teachers, stats["seconds"])  # verifies every shard
    result["store"] = check_store(stores, plan)
    return result


def latest_checkpoint_epoch(snapshots: str) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered (0: none yet).

    The controller writes this snapshot once it has registered a reported checkpoint; a worker that dies
    after reporting a checkpoint the controller has not registered yet rightly restarts from the one before.
    """
    best = 0
    for path in glob.glob(snapshots):
        try:
            latest = json.loads(Path(path).read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being written
            continue
        best = max(best, int((latest.get("metrics") or {}).get("epoch", 0)))
    return best


def distill(workdir: Path) -> dict:
    """Demo tasks trimmed to 100 training rows (300 for sentiment with its masked copies); the store is
    labeled in this driver before the cluster starts. Ray Train distils with 2 workers on 2 nodes; a worker
    node hosting one of them dies once the first epoch checkpoint is registered."""
    epochs = 8
    ctx, tasks, teachers, labels, root = setup(workdir, [
        *(f"tasks.{t}.max_train_examples=100" for t in ("sentiment", "paraphrase", "similarity")),
        f"distill.epochs={epochs}", "distill.num_workers=2", "distill.cpus_per_worker=1", "distill.max_failures=2"])
    cfg, stores, plan = ctx.cfg, labels.stores, labels.plan
    settings = labeling_settings(ctx, teachers)
    for key in ("num_actors", "cpus_per_actor", "gpus_per_actor"):  # the pool's resources, not the labeler's
        settings.pop(key)
    labeler = ShardLabeler(stores={t: (s.root, s.key) for t, s in stores.items()}, emit_rows=False, **settings)
    labeler(shard_rows(plan))
    finish_labels(ctx, labels, teachers, 0.0)
    say("store_labeled_locally")

    result = {}
    snapshots = str(root / "cache" / "distill" / "*" / "ray_train" / "distill" / "checkpoint_manager_snapshot.json")
    with cluster_for("distill") as (cluster, workers):
        result["nodes"] = describe(cluster, workers, "distill")
        killer = NodeKiller(cluster, workers, TRAIN_WORKER, lambda: latest_checkpoint_epoch(snapshots) >= 1,
                            context=lambda: {"checkpoint_epoch": latest_checkpoint_epoch(snapshots)},
                            min_alive=cfg.distill.num_workers).start()
        started = time.perf_counter()
        students = Path(distill_students(ctx, tasks, labels, teachers).dir)
        result["distill_seconds"] = round(time.perf_counter() - started, 2)
        say("distill_done")
        killer.thread.join(timeout=30)
        result["removal"] = killer.record
        result["actors"] = actors(TRAIN_WORKER)
    ckpts = sorted(glob.glob(str(students.parent / "ray_train" / "distill" / "checkpoint_2*")))
    result["checkpoints"] = [Path(c).name for c in ckpts]
    result["train_state"] = json.loads((Path(ckpts[-1]) / "train_state.json").read_text())
    result["train_report"] = json.loads((students.parent / "train_report.json").read_text())
    result["epochs"] = epochs
    result["store_train"] = {t: {"rows": len(ids), "ids": ids_digest(ids)} for t, s in stores.items()
                             for ids in [sorted(s.read(split="train")["id"])]}
    result["students"] = sorted(p.name for p in students.iterdir() if (p / "weights.safetensors").exists())
    return result


def main() -> int:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"labeling": labeling, "distill": distill}[scenario](workdir)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["timeline"] = TIMELINE
    (workdir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"[scenario] {scenario} done in {result['seconds']}s: {workdir / 'result.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
