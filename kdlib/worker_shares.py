"""How Ray Train deals each dataset's rows to the training workers, without losing any.

Ray Train's default `DataConfig` splits every dataset with `streaming_split(n, equal=True)`, which makes
the shares equal by dropping up to n - 1 rows (the transfer benchmark lost one STS-B row in 65,749 to it).
The training loop does not need equal shares: every worker takes as many batches as the largest share
needs (kdlib.features.length_grouped_batches), so `LosslessSplit` keeps every row:

- a materialized dataset (the soft-target store's) is first cut on the driver, before the trainer
  starts, into one block per worker whose sizes differ by at most one row (`in_worker_blocks`);
  `LosslessSplit` then deals whole blocks (`Dataset.split(n, equal=False)`): deterministic, so a
  restarted worker group gets the same rows as before;
- a streaming one (labeling feeding training directly) is split with `streaming_split(equal=False)`:
  every row reaches exactly one worker, in whatever share the workers' pace gives them.

`configure` starts no Ray task: it runs again when Ray Train restarts its workers, and then the workers
hold the CPUs a task would wait for (0.9 each on 2 cores), so `ray.data.from_arrow`, `split_at_indices`
or a row count there would hang the restart (as the first version of this module did).
"""

from __future__ import annotations

import pyarrow as pa
import ray
import ray.data
from ray.data.dataset import MaterializedDataset
from ray.train import DataConfig


def row_ranges(n_rows: int, n_shares: int) -> list[tuple[int, int]]:
    """[start, stop) of each share: contiguous, covering [0, n_rows), sizes differing by at most one."""
    bounds = [round(i * n_rows / n_shares) for i in range(n_shares + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def in_worker_blocks(ds: MaterializedDataset, num_workers: int) -> MaterializedDataset:
    """`ds`'s rows, in order, as `num_workers` blocks whose sizes differ by at most one row (on the
    driver: Ray serializes only a slice's own rows). The new blocks are a second copy in the object store
    for as long as the caller keeps `ds` (the soft-target stores here: tens of MB; Ray spills to disk
    what does not fit)."""
    tables = ray.get(ds.to_arrow_refs())  # arrow blocks (from_arrow, from_items) come back without a task
    if not tables:
        return ds
    table = pa.concat_tables(tables, promote_options="default")
    return ray.data.from_arrow([table.slice(start, stop - start)
                                for start, stop in row_ranges(table.num_rows, num_workers)])


class LosslessSplit(DataConfig):
    """A `ray.train.DataConfig` that splits every dataset across the workers without dropping rows."""

    def configure(self, datasets: dict, world_size: int, worker_handles=None, worker_node_ids=None,
                  **kwargs) -> list[dict]:
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            if isinstance(ds, MaterializedDataset):  # its blocks are in the object store: dealt, not read
                for rank, share in enumerate(ds.split(world_size, equal=False)):
                    output[rank][name] = share.iterator()
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids if self._enable_shard_locality else None
            for rank, share in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = share
        return output
