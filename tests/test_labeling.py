"""Labeling on real Ray Data actors: exact logits, exactly-once under a killed actor, resume after an interrupt."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import kill_once_when

from kdlib.artifact import save_model
from kdlib.branched import BranchedModel, BranchSpec, member_name
from kdlib.demo import generate
from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.labeling import pending, run_labeling
from kdlib.predict import predict
from kdlib.soft_targets import SoftTargetStore, plan_shards, teacher_logits_array

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
SOURCE = resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2")
TASKS = {"sentiment": ("classification", 2, False), "similarity": ("regression", 1, True)}


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory):
    """K = 3 members per task sharing the bottom 2 of 4 layers (perturbed, so members differ)."""
    root = tmp_path_factory.mktemp("ensembles")
    encoder = load_encoder(SOURCE, True, TINY, seed=0)
    dirs = {}
    for t, (task, (kind, c, _)) in enumerate(TASKS.items()):
        model = BranchedModel.from_encoder(encoder, [BranchSpec(member_name(task, k), kind, c, 2, 2) for k in range(3)])
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith("branches."):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        dirs[task] = str(save_model(model.eval(), root / task, include_trunk=False))
    return dirs


def _examples(task: str, n: int) -> pd.DataFrame:
    """Demo rows of a task: dev first (as planned), then train."""
    frames = []
    for split in ("dev", "train"):
        f = generate(task, split).iloc[: n // 2].copy()
        pair = "sentence2" if "sentence2" in f else None
        frames.append(pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(f))], "task": task, "split": split,
                                    "source": "original", "text": f[pair.replace("2", "1") if pair else "sentence"],
                                    "text_pair": f[pair] if pair else None, "label": np.nan}))
    return pd.concat(frames, ignore_index=True)


def _settings(ensembles, **over):
    return {**dict(ensembles=ensembles, encoder_source=SOURCE, random_init=True, config_overrides=TINY, seed=0,
                   max_length=32, num_actors=2, cpus_per_actor=0.5, torch_threads=1, batch_size=16), **over}


def _plan(n=120, shard_size=20):
    plan = []
    for task in TASKS:
        plan += plan_shards(task, _examples(task, n), shard_size)
    return plan


def test_stored_logits_equal_each_member_run_on_its_own(ray_session, ensembles, tmp_path):
    """Every member's logits per example, from the shared-trunk actor, equal the member's own forward pass."""
    stores = {t: SoftTargetStore(str(tmp_path), t, "k") for t in TASKS}
    plan = _plan()
    lines = []
    stats = run_labeling(plan, stores=stores, progress_seconds=1, log=lines.append, **_settings(ensembles))
    assert stats["labeled"] == len(plan) and stats["already_committed"] == 0
    # Progress: the plan, then examples done, rate and ETA, ending at all examples.
    n = sum(shard.rows for shard, _ in plan)
    assert lines[0] == f"[labels] {len(plan)} shards planned, 0 already in the store, labeling {len(plan)} ({n} examples)"
    assert re.fullmatch(rf"\[labels\] {n}/{n} examples \(100\.0%\), [\d.]+ ex/s, elapsed \d+s, ETA 0s", lines[-1])
    from kdlib.artifact import load_model

    encoder = load_encoder(SOURCE, True, TINY, seed=0)
    tok = load_tokenizer(SOURCE)
    for task, (kind, c, has_pair) in TASKS.items():
        store = stores[task]
        store.finalize([s for s, _ in plan if s.task == task], {})
        rows = store.read()
        assert rows["id"].is_unique and len(rows) == 120
        model, _ = load_model(ensembles[task], encoder=encoder)
        got = teacher_logits_array(rows)  # (N, K, C)
        assert got.shape == (120, 3, c)
        for k in range(3):
            want = predict(model, tok, rows["text"].tolist(), rows["text_pair"].tolist() if has_pair else None,
                           [member_name(task, k)], max_length=32)[member_name(task, k)]
            np.testing.assert_allclose(got[:, k], want, atol=1e-5)
        assert not np.allclose(got[:, 0], got[:, 1])  # members really differ


def test_killed_labeling_actor_loses_and_duplicates_nothing(ray_session, ensembles, tmp_path):
    """SIGKILL a labeling actor once the first shard is committed: Ray Data restarts it and retries its
    task; every shard is committed once and every id appears exactly once."""
    stores = {t: SoftTargetStore(str(tmp_path), t, "k") for t in TASKS}
    plan = _plan(n=200, shard_size=10)

    def first_shard_committed() -> bool:
        return any(list(Path(s.shards_dir).glob("*.json")) for s in stores.values() if Path(s.shards_dir).exists())

    killer, killed = kill_once_when(first_shard_committed, "ray::MapWorker(MapBatches(ShardLabeler))",
                                    timeout=300, poll=0.05)
    stats = run_labeling(plan, stores=stores, progress_seconds=2, **_settings(ensembles))
    killer.join(timeout=5)
    assert killed, "no labeling actor was killed"
    assert stats["labeled"] + stats["read_back"] == len(plan)
    for task in TASKS:
        manifest = stores[task].finalize([s for s, _ in plan if s.task == task], {})
        rows = stores[task].read()
        assert manifest["rows"] == len(rows) == 200
        assert rows["id"].is_unique and set(rows["id"]) == set(_examples(task, 200)["id"])


def test_interrupted_driver_resumes_with_only_the_missing_shards(ray_session, ensembles, tmp_path):
    """Ctrl-C in the driver after the first shard: the rerun labels exactly the shards not committed
    and leaves the committed ones untouched."""
    stores = {t: SoftTargetStore(str(tmp_path), t, "k") for t in TASKS}
    plan = _plan(n=160, shard_size=10)

    def interrupt(summary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_labeling(plan, stores=stores, on_shard=interrupt, **_settings(ensembles, num_actors=1))
    snapshot = _settled_commits(stores)
    assert 1 <= len(snapshot) < len(plan)
    missing = pending(plan, stores)
    assert len(missing) == len(plan) - len(snapshot)

    stats = run_labeling(plan, stores=stores, **_settings(ensembles))
    assert stats["already_committed"] == len(snapshot)
    assert stats["labeled"] == len(missing) and stats["read_back"] == 0
    for path, mtime in snapshot.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    for task in TASKS:
        stores[task].finalize([s for s, _ in plan if s.task == task], {})
        rows = stores[task].read()
        assert rows["id"].is_unique and len(rows) == 160


def _settled_commits(stores) -> dict[Path, int]:
    """Commit records once no in-flight task of the interrupted run is still committing."""
    last, stable_since = None, time.time()
    while time.time() - stable_since < 3:
        now = {p: p.stat().st_mtime_ns for s in stores.values() if Path(s.shards_dir).exists()
               for p in Path(s.shards_dir).glob("*.json")}
        if now != last:
            last, stable_since = now, time.time()
        time.sleep(0.2)
    return last


def _labeled(stores, plan) -> dict[str, pd.DataFrame]:
    for task, store in stores.items():
        store.finalize([s for s, _ in plan if s.task == task], {})
    return {task: store.read().sort_values("id").reset_index(drop=True) for task, store in stores.items()}


def test_out_of_memory_splits_the_batch_and_labels_every_example_once(ray_session, ensembles, tmp_path):
    """Batches of more than 3 rows raise torch.OutOfMemoryError in the actors (injected): each is split in
    halves until it fits, and the store holds every example once with the logits of an uninjected run."""
    plan = _plan(n=60, shard_size=20)
    clean = {t: SoftTargetStore(str(tmp_path / "clean"), t, "k") for t in TASKS}
    split = {t: SoftTargetStore(str(tmp_path / "split"), t, "k") for t in TASKS}
    run_labeling(plan, stores=clean, **_settings(ensembles, num_actors=1))
    stats = run_labeling(plan, stores=split, **_settings(ensembles, num_actors=1, inject_oom_rows=3))
    assert stats["labeled"] == len(plan)
    want, got = _labeled(clean, plan), _labeled(split, plan)
    for task in TASKS:
        assert got[task]["id"].is_unique and got[task]["id"].tolist() == want[task]["id"].tolist()
        # Smaller batches pad less: equal up to float rounding.
        np.testing.assert_allclose(teacher_logits_array(got[task]), teacher_logits_array(want[task]), atol=1e-5)


def test_one_example_that_does_not_fit_names_what_to_lower():
    from kdlib.errors import DeviceOutOfMemory
    from kdlib.labeling import split_on_out_of_memory

    calls = []

    def forward(enc):
        calls.append(len(enc["input_ids"]))
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceOutOfMemory, match=r"one example of 7 tokens .* lower encoder\.max_length"):
        split_on_out_of_memory(forward, {"input_ids": torch.zeros(4, 7, dtype=torch.long)})
    assert calls == [4, 2, 1]  # halved down to one row, then given up
    with pytest.raises(ValueError):  # other errors are not memory: not retried
        split_on_out_of_memory(lambda enc: (_ for _ in ()).throw(ValueError("bug")), {"input_ids": torch.zeros(2, 3)})


def test_bf16_labeling_agrees_with_fp32(ray_session, ensembles, tmp_path):
    """Actors under CPU bf16 autocast store logits within 0.05 of fp32's (bf16 rounds each matmul to ~0.4%;
    these tiny random teachers' logits are ~0.1-1 in size: measured max difference 0.003), with a token budget
    cutting the batches (the budget changes padding, not results)."""
    plan = _plan(n=40, shard_size=20)
    fp32 = {t: SoftTargetStore(str(tmp_path / "fp32"), t, "k") for t in TASKS}
    bf16 = {t: SoftTargetStore(str(tmp_path / "bf16"), t, "k") for t in TASKS}
    run_labeling(plan, stores=fp32, **_settings(ensembles, num_actors=1))
    run_labeling(plan, stores=bf16, **_settings(ensembles, num_actors=1, precision="bf16", batch_tokens=64))
    want, got = _labeled(fp32, plan), _labeled(bf16, plan)
    for task in TASKS:
        diff = np.abs(teacher_logits_array(got[task]) - teacher_logits_array(want[task]))
        assert 0 < diff.max() < 0.05, diff.max()


def test_labeling_actors_ask_for_their_gpu_share(ray_session, ensembles, tmp_path):
    """labeling.gpus_per_actor reaches Ray: with the session's 2 logical GPUs, actors asking for 0.5 GPU each
    run (on the CPU: no CUDA here) and their assigned resources hold that share."""
    import ray

    from kdlib.labeling import labeling_dataset

    plan = _plan(n=20, shard_size=10)
    stores = {t: SoftTargetStore(str(tmp_path), t, "k") for t in TASKS}
    ds = labeling_dataset(plan, stores=stores, emit_rows=False, **_settings(ensembles, gpus_per_actor=0.5))
    op = ds._logical_plan.dag
    assert op.ray_remote_args.get("num_gpus") == 0.5, op.ray_remote_args

    @ray.remote(num_gpus=0.5, num_cpus=0)
    def assigned():
        return ray.get_runtime_context().get_assigned_resources().get("GPU"), torch.cuda.is_available()

    assert ray.get(assigned.remote()) == (0.5, False)
    assert len(list(ds.iter_rows())) == len(plan)  # the pool ran on its GPU shares


def test_batches_prepared_in_the_background_come_in_order_and_errors_reach_the_consumer():
    from kdlib.labeling import in_background

    assert list(in_background(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("tokenizer failed")

    got = []
    with pytest.raises(ValueError, match="tokenizer failed"):
        for x in in_background(broken()):
            got.append(x)
    assert got == [1]
    gen = in_background(iter(range(1000)), depth=2)  # a consumer that stops early stops the producer
    assert next(gen) == 0
    gen.close()


def test_input_batches_cover_every_row_once_in_chunks(tokenizer):
    from kdlib.labeling import input_batches

    texts = [("word " * (i % 7 + 1)).strip() for i in range(50)]
    batches = list(input_batches(tokenizer, texts, [None] * 50, max_length=16, batch_size=4, batch_tokens=None,
                                 pin=False, chunk_batches=2))
    assert sorted(i for idx, _ in batches for i in idx.tolist()) == list(range(50))
    assert all(idx.max() // 8 == idx.min() // 8 for idx, _ in batches)  # a batch stays inside its chunk of 8 rows
    assert all(enc["input_ids"].dtype == torch.int64 and len(enc["input_ids"]) == len(idx) for idx, enc in batches)
