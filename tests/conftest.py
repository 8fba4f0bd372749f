"""Shared fixtures: one Ray for the whole session, tiny random BERT encoders, the tiny-run overrides."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Where this "node" mirrors folders from remote storage: set before Ray starts, so its workers share it and a
# test can wipe it to play a fresh node.
os.environ.setdefault("KDLIB_LOCAL_CACHE", tempfile.mkdtemp(prefix="kdlib-test-mirrors-"))
# The AWS SDK in pyarrow sends uploads aws-chunked with a trailing checksum, which real S3 decodes and moto's
# server (the tests' S3) stores verbatim; checksums only when required keeps the bodies plain. Set before Ray
# starts, so its workers' uploads (labeling actors, teacher tasks, Ray Train) get it too.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
# Signed requests: moto refuses anonymous overwrites (Ray Train re-creates its folder markers).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "kdlib-tests")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kdlib-tests")

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def benchmark_module(name: str):
    """jobs/benchmarks/<name>.py, imported (jobs/ is not a package: its folder joins the end of sys.path, so it
    shadows nothing the tests import otherwise)."""
    if str(JOBS) not in sys.path:
        sys.path.append(str(JOBS))
    return importlib.import_module(f"benchmarks.{name}")


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
        # Two logical GPUs: work that asks for GPUs (tests/test_gpu_plumbing.py) is scheduled as on a GPU
        # machine, and runs on the CPU because CUDA is not there. Nothing asks for them by default.
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on loopback for the session: 'host:port'. Ray workers reach it too."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh bucket as a storage root URI, e.g. s3://t-abc123/kdlib?endpoint_override=127.0.0.1:5123&..."""
    import uuid

    import pyarrow.fs as pafs

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    query = f"endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
    fs.create_dir(bucket)
    return f"s3://{bucket}/kdlib?{query}"


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
    """Processes of this test session's Ray cluster whose title (Ray renames its workers `ray::<Actor>...`)
    starts with `prefix`: the way tests find a Ray Train worker or a Ray Data actor to kill.

    Only children of this cluster's raylets count (matched by the raylet socket `ray.nodes()` reports), so
    a test never kills a worker of another Ray cluster on the same machine (a benchmark running beside it).
    """
    import ray

    sockets = {f"--raylet_socket_name={n['RayletSocketName']}".encode() for n in ray.nodes() if n["Alive"]}
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not title.startswith(prefix):
                    continue
                parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]  # field 4: the ppid
                parent_args = Path("/proc", parent, "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if sockets & set(parent_args):
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


@pytest.fixture(scope="session")
def tiny_pipeline(ray_session, tmp_path_factory):
    """The demo pipeline's stages called one by one (kdlib.pipeline) on a tiny random encoder and 100
    training rows per task, 1 Ray Train worker: what the stage tests (tests/test_stage_*.py) look at."""
    from types import SimpleNamespace

    from kdlib.config import load_run_config
    from kdlib.pipeline import (RunContext, distill_students, evaluate, label_tasks, load_data, merge_students,
                                plan_labels, train_teachers)

    root = tmp_path_factory.mktemp("stages")
    overrides = tiny_run_overrides(root) + [f"tasks.{t}.max_train_examples=100"
                                            for t in ("sentiment", "paraphrase", "similarity")] + [
        "distill.num_workers=1", "distill.epochs=1", "run_name=stages"]
    cfg = load_run_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", overrides)
    lines: list[str] = []
    ctx = RunContext.create(cfg, log=lines.append)
    tasks = load_data(ctx)
    teachers = train_teachers(ctx, tasks)
    labels = plan_labels(ctx, tasks, teachers)
    label_tasks(ctx, labels, teachers)
    students = distill_students(ctx, tasks, labels, teachers)
    model_dir = merge_students(ctx, tasks, students)
    results = evaluate(ctx, tasks, labels, model_dir)
    return SimpleNamespace(cfg=cfg, overrides=overrides, ctx=ctx, lines=lines, tasks=tasks, teachers=teachers,
                           labels=labels, students=students, model_dir=model_dir, results=results, root=root)
