"""What every stage of a run shares: the validated config, the resolved encoder and the stage cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kdlib import storage
from kdlib.config import RunConfig
from kdlib.encoder import EncoderRef
from kdlib.stages import StageCache


@dataclass
class RunContext:
    cfg: RunConfig
    encoder: EncoderRef
    cache: StageCache
    log: Callable[[str], None] = field(default=print)  # where the stages' progress lines go (kdlib.console)

    @classmethod
    def create(cls, cfg: RunConfig, log=print) -> "RunContext":
        """Resolve the encoder (local folder, offline package or hub id) and open the run's stage cache."""
        return cls(cfg, EncoderRef.resolve(cfg.encoder, cfg.seed), StageCache(cfg.storage_root, log=log), log)

    @property
    def run_dir(self) -> str:
        """<storage_root>/<run_name>: the run's config, results and log."""
        return storage.child(self.cfg.storage_root, self.cfg.run_name)


def placement(nodes: list[str], unit: str) -> str:
    """'192.0.2.7 (2 train workers)' from one node address per worker, shard or task."""
    counts = Counter(n for n in nodes if n)
    return ", ".join(f"{n} ({c} {unit}{'s' if c > 1 else ''})" for n, c in sorted(counts.items()))
