"""Whether the Ray cluster can give what a config asks for: its GPU settings, checked before any work starts.

Ray queues a task, actor, worker group or trial whose resources no node offers, forever and quietly. A run
that asks for GPUs on a cluster without them would print its first stage line and then hang; this check
turns that into an error naming the setting and what the cluster offers. A cluster whose autoscaler can
add GPU nodes (cluster/: the KubeRay "gpu" group and the `ray up` GPU node type start from zero) counts
what it can grow to, as Ray Train does.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.device import cpu_bf16_support, precision_advice
from kdlib.errors import ResourceError


@dataclass(frozen=True)
class GpuAsk:
    """One setting's GPU request: `each` per unit of work, `together` units that Ray must place at once (a
    Ray Train worker group, a fixed labeling actor pool); `count_setting` names what sets `together`."""

    setting: str
    each: float
    together: int = 1
    count_setting: str | None = None

    @property
    def total(self) -> float:
        return self.each * self.together


@dataclass(frozen=True)
class ClusterGpus:
    """GPUs in the whole cluster and on its largest node, now or once its autoscaler has added nodes."""

    total: float
    largest_node: float
    autoscaled: bool = False

    def describe(self) -> str:
        if not self.total:
            return "the cluster has no GPUs" + (" and its autoscaler adds none" if self.autoscaled else "")
        return (f"the cluster {'can grow to' if self.autoscaled else 'has'} {self.total:g} GPUs, at most "
                f"{self.largest_node:g} on one node")


def gpu_asks(cfg) -> list[GpuAsk]:
    """The GPU settings of a run config (kdlib.config.RunConfig) or a depth-search config (TuneRunConfig)."""
    asks = [GpuAsk("teachers.gpus_per_task", cfg.teachers.gpus_per_task)]
    if hasattr(cfg, "labeling"):
        lab, d = cfg.labeling, cfg.distill
        asks += [GpuAsk("labeling.gpus_per_actor", lab.gpus_per_actor, lab.num_actors, "labeling.num_actors"),
                 GpuAsk("distill.gpus_per_worker", d.gpus_per_worker, d.num_workers, "distill.num_workers")]
    if hasattr(cfg, "search"):
        asks.append(GpuAsk("search.gpus_per_trial", cfg.search.gpus_per_trial))
    return [a for a in asks if a.each > 0]


def check_gpu_asks(asks: list[GpuAsk], gpus: ClusterGpus) -> None:
    """ResourceError for the first ask that no node, or the whole cluster at once, can give."""
    for ask in asks:
        if ask.each > gpus.largest_node:
            raise ResourceError(f"{ask.setting}={ask.each:g} asks Ray for {ask.each:g} GPU per unit of work, but "
                                f"{gpus.describe()}: lower {ask.setting} (0 runs on CPUs) or run on a cluster with "
                                "GPU workers (cluster/README.md)")
        if ask.total > gpus.total:
            raise ResourceError(f"{ask.count_setting}={ask.together} x {ask.setting}={ask.each:g} = {ask.total:g} "
                                f"GPUs must run at once, but {gpus.describe()}: lower one of them")


def cluster_gpus() -> ClusterGpus:
    """What the connected Ray cluster offers: its alive nodes' GPUs, or what its autoscaler may add."""
    import ray
    from ray._private.state import state  # Ray Train V2 reads the autoscaler's limits the same way

    nodes = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    total, largest = float(sum(nodes)), float(max(nodes, default=0.0))
    config = state.get_cluster_config()
    groups = [] if config is None else [g for g in config.node_group_configs if g.max_count != 0]
    grown = [float(g.resources.get("GPU", 0)) for g in groups]
    if any(grown):
        most = state.get_max_resources_from_cluster_config() or {}
        return ClusterGpus(total=max(total, float(most.get("GPU", 0))), largest_node=max(largest, *grown),
                           autoscaled=True)
    return ClusterGpus(total=total, largest_node=largest)


def check_cluster_gpus(cfg) -> None:
    """Raise ResourceError when `cfg` asks for GPUs the connected cluster cannot give (nothing to check at 0)."""
    asks = gpu_asks(cfg)
    if asks:
        check_gpu_asks(asks, cluster_gpus())


def precision_note(cfg) -> str | None:
    """kdlib.device.precision_advice for a run config on this machine's CPU (None: nothing to say)."""
    return precision_advice(cfg.precision, uses_gpus=bool(gpu_asks(cfg)), support=cpu_bf16_support())
