"""Shared fixtures: one Ray for the whole session, tiny random BERT encoders, the tiny-run overrides."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_run_overrides(storage_root) -> list[str]:
    """`key=value` overrides that turn configs/demo.yaml into a fast run on a tiny random encoder."""
    return [
        f"storage_root={storage_root}",
        "encoder.random_init=true",
        "encoder.config_overrides={hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, "
        "intermediate_size: 64}",
        "encoder.max_length=32",
        "tasks.sentiment.max_train_examples=200",
        "tasks.paraphrase.max_train_examples=200",
        "tasks.similarity.max_train_examples=200",
        "tasks.paraphrase.fine_tune_layers=3",
        "tasks.paraphrase.branch_layers=2",
        "teachers.epochs=1",
        "distill.epochs=2",
        "labeling.batch_size=32",
        "labeling.cpus_per_actor=0.5",
        "distill.cpus_per_worker=0.5",
    ]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # No dashboard: tests/test_job_submit.py starts its own head node, and two dashboards (with their
        # agents) on one machine left that head without a job agent.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's WordPiece tokenizer (from the offline package), shared by every test that tokenizes."""
    from kdlib.encoder import load_tokenizer, resolve_encoder_path

    return load_tokenizer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.fixture
def tiny_encoder() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, max_position_embeddings=64, **TINY_ENCODER)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture
def tiny_batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def pids_titled(prefix: str) -> list[int]:
    """Processes whose title (Ray renames its workers `ray::<Actor>...`) starts with `prefix`: the way tests
    find a Ray Train worker or a Ray Data actor to kill."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(prefix):
                pids.append(int(entry.name))
    return sorted(pids)


def kill_once_when(ready, prefix: str, *, timeout: float = 600, poll: float = 0.1):
    """Start a thread that SIGKILLs the first process titled `prefix` once `ready()` is true.

    Returns (thread, killed): `killed` holds the pid after the kill, so a test can assert it happened.
    """
    killed: list[int] = []

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            if ready():
                pids = pids_titled(prefix)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(poll)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed
