"""Connecting to Ray: the cluster a submitted job runs in, an explicit address, or a local embedded Ray; and,
for tests and benchmarks, a local head node and a multi-node cluster simulated on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import ray
import ray.data

from kdlib.console import ray_started


def init_ray(address: str | None, num_cpus: int | None, log=print) -> None:
    """Join a cluster when there is one to join, else start Ray inside this process's machine.

    `ray job submit` sets RAY_ADDRESS for the driver, so the same job script runs on a cluster and
    standalone without code changes. Inside a `kdlib.console.run_log` block, Ray's start-up lines and its
    workers' output go where the run log sends them (run.log only, unless verbose).
    """
    # Long stages print their own progress lines (examples done, rate, ETA); Ray Data's per-operator bars
    # would repeat them from every actor into the job log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
        ray_started()
        log(f"[ray] joined cluster at {target}: {ray.cluster_resources().get('CPU', 0):g} CPUs")
    else:
        # "local": always a fresh embedded Ray, never a stale cluster recorded in /tmp/ray. The dashboard
        # (on 127.0.0.1) stays on: Ray Train's placement-group cleaner polls the State API it serves.
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
        ray_started()
        log(f"[ray] started local Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs")


@contextlib.contextmanager
def local_head(log_path: str | Path, *, port: int = 6399, dashboard_port: int = 8299, agent_port: int = 52399,
               num_cpus: int = 2, timeout: float = 120):
    """A real head node on loopback with the dashboard (the Jobs API), as `ray start --head` starts one;
    yields the dashboard's address for `ray job submit --address`, then stops exactly its processes.

    `--block` keeps the head in the foreground, so terminating its process group leaves any other Ray on
    the machine alone. For tests and benchmarks; on a real cluster use `ray start` or cluster/ manifests.
    """
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with open(log_path, "w") as log:
        head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}",
                                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
                                 f"--num-cpus={num_cpus}", "--include-dashboard=true"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dashboard_port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{address}/api/version", timeout=2)
                    break
                except urllib.error.HTTPError:  # 401 without the token: the server is up
                    break
                except OSError:
                    if head.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"the head node's dashboard did not come up; see {log_path}")
                    time.sleep(1)
            yield address
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)


def submit_job(address: str, entrypoint: list[str], working_dir: str | Path, timeout: float = 1800
               ) -> subprocess.CompletedProcess:
    """`RAY_AUTH_MODE=token ray job submit --address A --working-dir D -- ENTRYPOINT`, waiting for the end.

    Retries while the head's job agent is still starting ("No available agent")."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # local clusters start with token auth on
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(working_dir), "--", *entrypoint]
    for _ in range(12):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(5)
    return done


@contextlib.contextmanager
def simulated_cluster(head_cpus: float, worker_cpus: list[float], *, system_config: dict | None = None):
    """A Ray cluster of separate nodes on this machine (`ray.cluster_utils.Cluster`: a head with `head_cpus`
    logical CPUs and one worker node per entry of `worker_cpus`), with this process connected as its driver.

    Yields (cluster, worker nodes). The head gets its own dashboard and agent ports (other Ray heads on the
    machine keep the defaults); the State API works through it. On the way out every node still up is
    killed (no graceful wait) and /tmp/ray/ray_current_cluster, which `Cluster` overwrites, is given back.
    A driver joins one Ray at a time: call this from a process that has not joined another one.
    """
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster

    previous = read_ray_address()
    args = {"num_cpus": head_cpus, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()}
    if system_config:
        args["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=args)
    try:
        workers = [cluster.add_node(num_cpus=c) for c in worker_cpus]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster, workers
    finally:
        ray.shutdown()
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
        if read_ray_address() in (None, cluster.address):
            if previous and previous != cluster.address:
                write_ray_address(previous)
            else:
                reset_ray_address()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
