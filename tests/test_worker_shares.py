"""kdlib.worker_shares: every row reaches exactly one training worker (Ray Train's default split drops
up to n - 1 rows of each dataset to make the shares equal), and dealing the rows starts no Ray task (Ray
Train deals them again when it restarts its workers, who then hold every CPU)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from kdlib.worker_shares import LosslessSplit, in_worker_blocks, row_ranges


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


def deal(datasets: dict, world_size: int = 2) -> list[dict]:
    return LosslessSplit().configure(datasets, world_size=world_size, worker_handles=None, worker_node_ids=None)


def in_thread(fn, timeout: float = 60):
    """fn's result, or a failure if it has not returned within `timeout` seconds (a task waiting for a CPU)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still waiting after {timeout}s"
    return out["value"]


def test_a_store_dataset_with_an_odd_row_count_loses_no_row(ray_session):
    """A store's dataset (one block per shard: 3, 3 and 1 rows) is recut into one block per worker on the
    driver; 2 workers get rows 0-3 and 4-6, the same on every deal."""
    import ray.data

    ids = [f"r{i}" for i in range(7)]
    blocks = [pa.table({"id": ids[s:s + 3], "x": list(range(s, min(s + 3, 7)))}) for s in (0, 3, 6)]
    ds = in_worker_blocks(ray.data.from_arrow(blocks), 2)
    assert ds.num_blocks() == 2
    got = [ids_of(share["sst2"]) for share in deal({"sst2": ds})]
    assert got == [ids[:4], ids[4:]]
    assert [ids_of(share["sst2"]) for share in deal({"sst2": ds})] == got


def test_dealing_rows_starts_no_task_while_the_workers_hold_every_cpu(ray_session):
    """As after a lost node: the restarted train workers hold the CPUs when Ray Train deals the rows. A
    dataset dealt then (and read by its workers) must not wait for a CPU."""
    import ray
    import ray.data

    @ray.remote
    class Hog:
        def ready(self) -> bool:
            return True

    # recut on the driver before the trainer starts, as run_distillation does
    ds = in_worker_blocks(ray.data.from_arrow([pa.table({"id": [f"r{i}" for i in range(5)]})]), 2)
    hog = Hog.options(num_cpus=ray.available_resources().get("CPU", 0)).remote()
    try:
        assert ray.get(hog.ready.remote(), timeout=60)
        shares = in_thread(lambda: deal({"t": ds}))
        got = in_thread(lambda: [ids_of(s["t"]) for s in shares])
        assert got == [["r0", "r1"], ["r2", "r3", "r4"]]
    finally:
        ray.kill(hog)


def test_a_streamed_dataset_with_an_odd_row_count_loses_no_row(ray_session):
    """Labeling streamed into training (a dataset still being computed): consumed by 2 workers at once,
    each row reaches exactly one of them."""
    import ray.data

    ds = ray.data.from_items([{"id": f"r{i}"} for i in range(101)], override_num_blocks=5).map_batches(
        lambda b: b, batch_format="pandas")
    shares = deal({"stream": ds})
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
