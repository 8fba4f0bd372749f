"""Labeling throughput on 1 and on 2 worker nodes of a Ray cluster simulated on this machine.

    cluster_benchmark("quick", "../shared/data/glue-mini", Path("bench-results"), "runs")

Each measurement starts `ray.cluster_utils.Cluster` (a head with no CPUs and N worker nodes, each its own
raylet and object store) in a fresh driver process (`python -m benchmarks.cluster` with jobs/ on PYTHONPATH; a driver joins one
Ray at a time and the caller may already run one), then runs the real labeling stage (kdlib.labeling,
Ray Data actor pool) with one labeling actor per worker node. Workload: the labeling benchmark's (MiniLM,
glue-mini SST-2 text joined and cut at 64 tokens, batch 64, K = 1 member with a 2-layer branch on a 4-layer
trunk), so the numbers compare with `jobs/benchmark.py labeling`.

Also the demo job standalone against submitted to a local head node (`job_overhead`): Ray's job overhead.

Configurations: N = 1 and N = 2 worker nodes of 1 logical CPU each, one actor of 1 torch thread per node
(a node is one core's worth: 2 nodes use both cores of this machine), and N = 2 nodes of 2 logical CPUs with
2 actors each (the `cluster/start-local.sh` sizing: 4 threads on 2 cores). Every node shares the machine's
2 cores with the other nodes' raylets, the GCS and the dashboard, so 2 nodes cannot exceed 2 cores' work:
scaling is bounded by 2x and by what the Ray processes themselves take.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import GLUE_MINI, ROOT, figure, fixed_length_texts, save_figure, scratch_dir

SCALES = {"quick": 1536, "full": 6144}  # examples labeled per configuration
SEQ, BATCH, SHARD = 64, 64, 64
# (label, worker nodes, logical CPUs per node, actors per node, torch threads per actor)
CONFIGS = [
    ("1 worker node", 1, 1, 1, 1),
    ("2 worker nodes", 2, 1, 1, 1),
    ("2 worker nodes, 2 actors each (4 threads on 2 cores)", 2, 2, 2, 1),
]


def cluster_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """Labeling examples/s on 1 and 2 simulated worker nodes; returns {"result": ..., "table": Markdown}."""
    import numpy as np
    import pandas as pd

    from kdlib.artifact import save_model
    from kdlib.branched import BranchedModel, BranchSpec, member_name
    from kdlib.config import load_run_config
    from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
    from kdlib.scoring import markdown_table
    from kdlib.pipeline.data import load_tasks

    n = SCALES[scale]
    cfg = load_run_config(GLUE_MINI, [f"data_dir={data_dir}"])
    source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
    texts = fixed_length_texts(load_tasks(cfg)["sst2"].train["text"].tolist(), load_tokenizer(source), n, SEQ)
    work = scratch_dir(storage_root, "kdlib-cluster-bench-")
    encoder = load_encoder(source)
    layers = encoder.config.num_hidden_layers
    model = BranchedModel.from_encoder(encoder, [BranchSpec(member_name("t", 0), "classification", 2, layers - 2, 2)])
    teacher = save_model(model.eval(), work / "teacher", include_trunk=False)
    examples = work / "examples.parquet"
    pd.DataFrame({"id": [f"x{i}" for i in range(n)], "task": "t", "split": "train", "source": "original",
                  "text": texts, "text_pair": None, "label": np.nan}).to_parquet(examples)

    runs = []
    try:
        for label, nodes, cpus, actors, threads in CONFIGS:
            print(f"[bench] {label}: {nodes} x {cpus} CPU, {actors} actor(s) per node ...", flush=True)
            run_dir = work / f"n{nodes}c{cpus}a{actors}"
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, never the caller's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "jobs"), env.get("PYTHONPATH")]))
            cmd = [sys.executable, "-m", "benchmarks.cluster", "--nodes", str(nodes), "--cpus", str(cpus),
                   "--actors-per-node", str(actors), "--threads", str(threads), "--teacher", str(teacher),
                   "--source", source, "--examples", str(examples), "--work", str(run_dir)]
            log = work / f"{run_dir.name}.log"
            load_before = round(os.getloadavg()[0], 2)  # other processes compete for the same cores
            with log.open("w") as f:
                proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
            if proc.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"cluster benchmark {label!r} failed ({proc.returncode}):\n{tail}")
            runs.append({"label": label, "load_average_before": load_before, **json.loads((run_dir / "result.json").read_text()),
                         "load_average_after": round(os.getloadavg()[0], 2)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one, two = runs[0], runs[1]
    result = {
        "benchmark": "cluster", "scale": scale, "examples": n, "seq_len": SEQ, "batch_size": BATCH,
        "shard_size": SHARD, "machine_cores": os.cpu_count(), "runs": runs,
        "scaling": {"end_to_end": two["examples_per_s"] / one["examples_per_s"],
                    "actors_busy": two["busy_examples_per_s"] / one["busy_examples_per_s"]},
    }
    rows = [[r["label"], f"{r['nodes']} x {r['cpus_per_node']:g}", r["actors"], r["threads"],
             r["examples_per_s"], r["busy_examples_per_s"], r["seconds"], r["startup_seconds"],
             r["cluster_start_seconds"], f"{r['examples_per_s'] / one['examples_per_s']:.2f}x",
             f"{r['busy_examples_per_s'] / one['busy_examples_per_s']:.2f}x",
             f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f}"] for r in runs]
    table = markdown_table(["configuration", "nodes x CPUs", "actors", "threads/actor", "examples/s (end to end)",
                            "examples/s (actors busy)", "labeling s", "of it not labeling s", "cluster start s",
                            "vs 1 node (end to end)", "vs 1 node (busy)", "load avg before / after"], rows)
    table += (f"\n\nMiniLM (K = 1, 2-layer branch), {n} examples of {SEQ} tokens, batch {BATCH}, shards of {SHARD}; a "
              f"head with no CPUs and N worker nodes (`ray.cluster_utils.Cluster`), all on this {os.cpu_count()}-core "
              f"machine. From 1 to 2 worker nodes: {result['scaling']['end_to_end']:.2f}x end to end, "
              f"{result['scaling']['actors_busy']:.2f}x while the actors are busy. The simulated nodes share the "
              f"machine's {os.cpu_count()} cores (and the raylets, GCS and dashboard run on them too), so 2 nodes "
              f"can at most double 1 node's single core, and more logical CPUs per node only add threads that wait "
              f"for the same cores; on separate machines each node would bring its own cores. 'Not labeling': the "
              f"stage's time minus the actors' average labeling time (actors starting: importing torch, loading MiniLM; "
              f"scheduling; the driver). The load average (1 minute, before / after each configuration) shows how "
              f"much else ran on the machine: above {os.cpu_count()} other processes took cores from the runs.")
    overhead = job_overhead(Path(storage_root))
    result["job_overhead"] = overhead
    table += (f"\n\n**The demo job standalone against submitted** (`python jobs/distill.py` from an empty storage "
              f"root, against `ray job submit --working-dir . -- python jobs/distill.py` to a local head node started "
              f"with `ray start --head`, same 2 CPUs): {overhead['standalone_seconds']:.0f} s standalone, "
              f"{overhead['submitted_seconds']:.0f} s submitted; Ray's job overhead (uploading the working directory, "
              f"starting the job's driver and runtime environment, besides the head node's own processes) is "
              f"{overhead['submitted_seconds'] - overhead['standalone_seconds']:+.0f} s.")
    _plot(runs, out / f"cluster-{scale}.png")
    return {"result": result, "table": table}


def job_overhead(scratch: Path) -> dict:
    """Wall time of `python jobs/distill.py` (the demo config) standalone and submitted to a local head node,
    each from an empty storage root; the head starts before the submitted run's clock does."""
    from kdlib.cluster import local_head, submit_job

    work = scratch_dir(scratch, "kdlib-job-overhead-")
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        started = time.perf_counter()
        with (work / "standalone.log").open("w") as f:
            proc = subprocess.run([sys.executable, "jobs/distill.py", f"storage_root={work / 'standalone'}"], cwd=ROOT,
                                  env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
        standalone = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"the standalone demo job failed; see {work / 'standalone.log'}")
        with local_head(work / "head.log", port=6389, dashboard_port=8289, agent_port=52389) as address:
            started = time.perf_counter()
            done = submit_job(address, ["python", "jobs/distill.py", f"storage_root={work / 'submitted'}"], ROOT)
            submitted = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"the submitted demo job failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return {"standalone_seconds": round(standalone, 1), "submitted_seconds": round(submitted, 1),
                "job_overhead_seconds": round(submitted - standalone, 1), "config": "configs/demo.yaml",
                "load_average_after": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plot(runs: list[dict], path: Path) -> None:
    fig, ax = figure((8, 3.5))
    y = range(len(runs))
    ax.barh([i + 0.2 for i in y], [r["busy_examples_per_s"] for r in runs], 0.4, label="actors busy")
    ax.barh([i - 0.2 for i in y], [r["examples_per_s"] for r in runs], 0.4, label="end to end")
    ax.set_yticks(list(y), [r["label"] for r in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("examples/s")
    ax.set_title("labeling on simulated worker nodes (one 2-core machine)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def measure(*, nodes: int, cpus: float, actors_per_node: int, threads: int, teacher: str, source: str,
            examples: str, work: Path) -> dict:
    """One configuration in this (fresh) process: start the cluster, label every example, stop the cluster."""
    import pandas as pd
    from ray.util.state import list_actors

    from kdlib.cluster import simulated_cluster
    from kdlib.labeling import run_labeling
    from kdlib.soft_targets import SoftTargetStore, plan_shards

    work.mkdir(parents=True, exist_ok=True)
    plan = plan_shards("t", pd.read_parquet(examples), SHARD)
    store = SoftTargetStore(str(work), "t", "bench")
    started = time.perf_counter()
    with simulated_cluster(0, [cpus] * nodes) as (cluster, workers):
        cluster_start = time.perf_counter() - started
        num_actors = nodes * actors_per_node
        stats = run_labeling(plan, stores={"t": store}, ensembles={"t": teacher}, encoder_source=source,
                             random_init=False, config_overrides={}, seed=0, max_length=SEQ, num_actors=num_actors,
                             cpus_per_actor=cpus / actors_per_node, torch_threads=threads, batch_size=BATCH,
                             progress_seconds=30)
        placed = [a.node_id for a in list_actors(address=cluster.address, limit=1000, raise_on_missing_output=False)
                  if "ShardLabeler" in (a.class_name or "")]
    records = store.commit_records()
    rows = sum(r["rows"] for r in records)
    assert rows == len(pd.read_parquet(examples)), (rows, stats)
    busy = sum(r["seconds"] for r in records) / num_actors  # the actors label in parallel
    return {"nodes": nodes, "cpus_per_node": cpus, "actors": num_actors, "threads": threads,
            "examples_per_s": rows / stats["seconds"], "busy_examples_per_s": rows / busy,
            "seconds": stats["seconds"], "startup_seconds": round(stats["seconds"] - busy, 2),
            "cluster_start_seconds": round(cluster_start, 2),
            "actors_per_worker_node": sorted(placed.count(w.node_id) for w in workers)}


def main() -> int:
    p = argparse.ArgumentParser(description="one configuration of cluster_benchmark (run by it)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--cpus", type=float, required=True)
    p.add_argument("--actors-per-node", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--work", type=Path, required=True)
    a = p.parse_args()
    result = measure(nodes=a.nodes, cpus=a.cpus, actors_per_node=a.actors_per_node, threads=a.threads,
                     teacher=a.teacher, source=a.source, examples=a.examples, work=a.work)
    (a.work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
