"""How Ray Train deals each dataset's rows to the training workers, without losing any.

Ray Train's default `DataConfig` splits every dataset with `streaming_split(n, equal=True)`, which makes
the shares equal by dropping up to n - 1 rows (the transfer benchmark lost one STS-B row in 65,749 to it).
The training loop does not need equal shares: every worker takes as many batches as the largest share
needs (kdlib.features.length_grouped_batches), so `LosslessSplit` keeps every row:

- a materialized dataset (the soft-target store's, `ray.data.from_arrow`) is cut into contiguous row
  ranges that differ by at most one row: deterministic, so a rerun gives every worker the same rows;
- a streaming one (labeling feeding training directly) is split with `equal=False`: every row reaches
  exactly one worker, in whatever share the workers' pace gives them.

Cutting here, on arrow tables already in the object store, starts no Ray task: Ray Data's
`split_at_indices` would start tasks that ask for a whole CPU, which the train workers hold.
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


class LosslessSplit(DataConfig):
    """A `ray.train.DataConfig` that splits every dataset across the workers without dropping rows."""

    def configure(self, datasets: dict, world_size: int, worker_handles=None, worker_node_ids=None,
                  **kwargs) -> list[dict]:
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if isinstance(ds, MaterializedDataset):
                tables = ray.get(ds.to_arrow_refs())  # zero-copy for arrow blocks: no task runs
                table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
                for rank, (start, stop) in enumerate(row_ranges(table.num_rows, world_size)):
                    output[rank][name] = ray.data.from_arrow(table.slice(start, stop - start)).iterator()
            else:
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if self._enable_shard_locality else None  # as Ray's default
                for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = split
        return output
