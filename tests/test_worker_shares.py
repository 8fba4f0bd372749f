"""kdlib.worker_shares: every row reaches exactly one training worker (Ray Train's default split drops
up to n - 1 rows of each dataset to make the shares equal)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from kdlib.worker_shares import LosslessSplit, row_ranges


@pytest.mark.parametrize("n_rows,n_shares", [(0, 2), (1, 2), (7, 2), (65749, 2), (10, 3), (5, 4)])
def test_row_ranges_cover_every_row_once_in_near_equal_shares(n_rows, n_shares):
    ranges = row_ranges(n_rows, n_shares)
    assert len(ranges) == n_shares
    assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no gap, no overlap
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def ids_of(iterator) -> list[str]:
    return [i for batch in iterator.iter_batches(batch_size=2, batch_format="pandas") for i in batch["id"]]


def test_a_store_dataset_with_an_odd_row_count_loses_no_row(ray_session):
    """The store's datasets (ray.data.from_arrow, one block per shard): 7 rows in blocks of 3, 3 and 1 go
    to 2 workers as rows 0-3 and 4-6, the same on every call."""
    import ray.data

    ids = [f"r{i}" for i in range(7)]
    blocks = [pa.table({"id": ids[s:s + 3], "x": list(range(s, min(s + 3, 7)))}) for s in (0, 3, 6)]
    ds = ray.data.from_arrow(blocks)
    shares = LosslessSplit().configure({"sst2": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    got = [ids_of(s["sst2"]) for s in shares]
    assert got == [ids[:4], ids[4:]]
    again = LosslessSplit().configure({"sst2": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    assert [ids_of(s["sst2"]) for s in again] == got


def test_a_streamed_dataset_with_an_odd_row_count_loses_no_row(ray_session):
    """Labeling streamed into training (a dataset still being computed): consumed by 2 workers at once,
    each row reaches exactly one of them."""
    import ray.data

    ds = ray.data.from_items([{"id": f"r{i}"} for i in range(101)], override_num_blocks=5).map_batches(
        lambda b: b, batch_format="pandas")
    shares = LosslessSplit().configure({"stream": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    got = [[], []]

    def consume(rank: int) -> None:
        got[rank] = ids_of(shares[rank]["stream"])

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got[0] + got[1]) == sorted(f"r{i}" for i in range(101))
