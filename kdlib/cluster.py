"""Connecting to Ray: the cluster a submitted job runs in, an explicit address, or a local embedded Ray."""

from __future__ import annotations

import os

import ray
import ray.data


def init_ray(address: str | None, num_cpus: int | None, log=print) -> None:
    """Join a cluster when there is one to join, else start Ray inside this process's machine.

    `ray job submit` sets RAY_ADDRESS for the driver, so the same job script runs on a cluster and
    standalone without code changes.
    """
    # Long stages print their own progress lines (examples done, rate, ETA); Ray Data's per-operator bars
    # would repeat them from every actor into the job log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
        log(f"[ray] joined cluster at {target}: {ray.cluster_resources().get('CPU', 0):g} CPUs")
    else:
        # "local": always a fresh embedded Ray, never a stale cluster recorded in /tmp/ray. The dashboard
        # (on 127.0.0.1) stays on: Ray Train's placement-group cleaner polls the State API it serves.
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
        log(f"[ray] started local Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs")
