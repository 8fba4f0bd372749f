"""Serve a kdlib model over HTTP with Ray Serve (POST /v1/predict, GET /v1/tasks, /healthz): the merged branched
model, or an end-to-end student (small_transformer, bilstm, cmow: multi-task, or per-task fine-tuned copies).

Locally (embedded Ray, 127.0.0.1:8000; Ctrl-C or SIGTERM stops it once in-flight requests are answered):
    python jobs/serve.py --model runs/demo                      # a run folder (its results.json) or a model folder
    python jobs/serve.py --model runs/demo --detach             # in the background; prints its pid: kill <pid> stops it
    python jobs/serve.py --model runs/demo/model --port 8001 --quantize int8
    python jobs/serve.py --model "s3://bucket/kdlib/demo"    # a run in remote storage: each replica mirrors it
    KDLIB_SERVE_TOKEN=$(cat ~/.kdlib_token) python jobs/serve.py --model runs/demo   # bearer token required
On a running cluster (the application keeps running after the job exits; the model must be readable from
every node: a storage URI, or a path on a shared disk; the token set in the nodes' environment or given as a file they mount):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/serve.py --model $PWD/runs/demo
Declaratively, with live model updates through user_config: serve deploy configs/serve/serve_config.yaml

Every application setting (kdlib.serve.api.ServeArgs, the `args:` of a Serve config) is also a flag here,
named after its field (`--max-batch-size`), with its default and description: see --help.

Running it again with a new --model on the same cluster updates the running application without
downtime: new replicas load and verify the new artifact before the old ones stop. (A local server holds its
port: stop it first.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kdlib.artifact import ArtifactError
from kdlib.cluster import init_ray
from kdlib.device import cpu_bf16_support, precision_advice
from kdlib.errors import ResourceError
from kdlib.resources import GpuAsk, check_gpu_asks, cluster_gpus
from kdlib.console import INTERRUPTED, interrupted_line, on_interrupt
from kdlib.serve.api import ServeArgs
from kdlib.serve.model import resolve_model_location
from kdlib.settings_flags import add_flags, flag_values

APP_NAME = "kdlib"
# Every ServeArgs field is a flag but model_dir, which --model gives: a run folder or URI, resolved first.
NOT_FLAGS = ("model_dir",)
DETACHED_START_TIMEOUT_S = 600  # a detached local server has this long to answer /healthz (Ray start + model load)
DRAIN_TIMEOUT_S = 60  # stopping: Serve's graceful_shutdown_timeout_s (20 s) for the requests in flight, with room
STOPPED, SERVE_AGAIN = "the application is shut down, the model artifact is unchanged", "run the same command to serve it"


class Launch(BaseModel):
    """This job's own settings; the application's are ServeArgs, which the replicas receive."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="run folder (with results.json) or model artifact folder, or a storage URI")
    host: str = Field("127.0.0.1", description="bind address of the HTTP proxy (0.0.0.0: all interfaces)")
    port: int = Field(8000, description="HTTP port")
    detach: bool = Field(False, description="return once deployed instead of waiting for Ctrl-C; without a cluster "
                                            "(RAY_ADDRESS) the server keeps running as a background process")
    log_file: str | None = Field(None, description="--detach without a cluster: the background server's output "
                                                   "(default: kdlib-serve-<port>.log in the temp folder)")


def parse_args(argv: list[str] | None) -> tuple[Launch, dict]:
    """(this launch's settings, the application's as given by the flags: each checked, not yet together)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, Launch)
    add_flags(p.add_argument_group("application (ServeArgs)"), ServeArgs, skip=NOT_FLAGS)
    ns = p.parse_args(argv)
    return Launch.model_validate(flag_values(ns, Launch)), flag_values(ns, ServeArgs, skip=NOT_FLAGS)


def serve_args(launch: Launch, flags: dict) -> ServeArgs:
    """Validated application args; the model folder absolute, the token required when one is configured here."""
    token_file = os.path.abspath(flags["token_file"]) if flags["token_file"] else None
    # A token set for this launch must not silently vanish because a replica's environment lacks it.
    required = flags["require_token"] or bool(token_file or os.environ.get(flags["token_env"]))
    return ServeArgs.model_validate({**flags, "model_dir": resolve_model_location(launch.model),
                                     "token_file": token_file, "require_token": required})


def joins_a_cluster() -> bool:
    """Whether this job runs on a Ray it did not start (a cluster, which keeps the application after it exits)."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def check_port_free(host: str, port: int) -> None:
    """ValueError when something already listens on host:port (the embedded Ray's proxy could not bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP proxy binds: TIME_WAIT is no listener
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"port {port} on {host} is not free ({e.strerror}): another server (a detached one "
                             "stops with kill <its pid>)? choose another --port") from None


def deploy(argv: list[str] | None = None) -> str:
    """Start (or update) the application; returns its base URL."""
    from ray import serve

    from kdlib.serve.app import build_app

    launch, flags = parse_args(argv)
    args = serve_args(launch, flags)
    if not joins_a_cluster():
        check_port_free(launch.host, launch.port)
    init_ray(None, None)
    if args.num_gpus:  # replicas the cluster cannot place would wait for ever: say so now
        check_gpu_asks([GpuAsk("--num-gpus", args.num_gpus, args.num_replicas, "--num-replicas")], cluster_gpus())
    if note := precision_advice(args.precision, uses_gpus=args.num_gpus > 0, support=cpu_bf16_support(),
                                flag="--precision "):  # e.g. fp32 replicas on a CPU that multiplies bf16 natively
        print(note)
    serve.start(http_options={"host": launch.host, "port": launch.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{launch.host}:{launch.port}"
    print(f"[serve] {APP_NAME}: {args.model_dir} ({args.quantize}, {args.precision}"
          f"{f', {args.num_gpus:g} GPU per replica' if args.num_gpus else ''}) at {url}/v1/predict "
          f"({'bearer token required' if args.require_token else 'no token'})")
    return url


def finishes_within(seconds: float, fn) -> bool:
    """Whether fn() returns without raising within `seconds` (run in a daemon thread, left behind if it hangs)."""
    ok = []
    thread = threading.Thread(target=lambda: ok.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(ok)


def serve_until_stopped() -> int:
    """Serve until SIGTERM (a service manager's stop) or SIGINT (Ctrl-C), then stop gracefully: the application
    is deleted first, its replicas answering the requests they hold (up to Serve's graceful_shutdown_timeout_s),
    then Ray stops. Returns the exit status: 0 (SIGTERM) or 130 (Ctrl-C), or 1 if the application could not be
    drained."""
    import ray
    from ray import serve

    stop = threading.Event()
    stopped_by = []

    def on_signal(signum, frame):
        if not stop.is_set():
            stopped_by.append(signum)
            print(f"[serve] {signal.Signals(signum).name}: answering the requests in flight, then stopping",
                  file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)  # instead of Ray's, which dumps a crash trace and exits at once
    while not stop.wait(3600):
        pass
    # Blocks until the replicas have drained and stopped; the proxy relays their answers meanwhile. Bounded:
    # with Ray's own processes signalled too (systemd's default KillMode=control-group), it would never return.
    drained = finishes_within(DRAIN_TIMEOUT_S, lambda: serve.delete(APP_NAME))
    if not drained:
        print(f"[serve] the application did not stop within {DRAIN_TIMEOUT_S} s: were Ray's processes signalled "
              "too? (under systemd, KillMode=mixed signals only this job)", file=sys.stderr, flush=True)
    if not finishes_within(DRAIN_TIMEOUT_S, ray.shutdown):  # the embedded Ray, Serve's controller and proxy with it
        print("[serve] Ray did not shut down; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    if stopped_by == [signal.SIGINT]:
        print(interrupted_line(STOPPED, then=SERVE_AGAIN), file=sys.stderr, flush=True)
        return INTERRUPTED if drained else 1
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0 if drained else 1


def run_detached(argv: list[str], launch: Launch, flags: dict) -> int:
    """--detach without a cluster: an embedded Ray lives only as long as its process, so this job runs again,
    without --detach, as a background process in a session of its own (immune to the terminal's hangup),
    its output in `launch.log_file`. Returns once the server answers at its URL, printing its pid: `kill <pid>`
    stops it gracefully (serve_until_stopped)."""
    try:
        serve_args(launch, flags)  # a bad --model or setting fails here, before anything starts
        check_port_free(launch.host, launch.port)
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log_path = Path(launch.log_file or Path(tempfile.gettempdir()) / f"kdlib-serve-{launch.port}.log").absolute()
    with open(log_path, "ab") as log:
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), *[a for a in argv if a != "--detach"]],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://{launch.host}:{launch.port}"
    probe_host = "127.0.0.1" if launch.host in ("0.0.0.0", "::", "") else launch.host
    deadline = time.monotonic() + DETACHED_START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print(f"error: the server exited with status {server.returncode} before answering; the end of "
                  f"{log_path}:\n" + "\n".join(tail), file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(f"http://{probe_host}:{launch.port}/healthz", timeout=5) as r:
                if json.load(r).get("status") == "ok":
                    break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGTERM)
            print(f"error: the server did not answer at {url}/healthz within {DETACHED_START_TIMEOUT_S} s; stopped "
                  f"it; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"[serve] {APP_NAME} runs in the background (pid {server.pid}) at {url}/v1/predict; its log: {log_path}; "
          f"stop it with: kill {server.pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    launch, flags = parse_args(argv)
    on_cluster = joins_a_cluster()
    if launch.detach and not on_cluster:
        return run_detached(argv, launch, flags)
    try:
        with on_interrupt(STOPPED, then=SERVE_AGAIN):  # Ctrl-C while the model loads
            deploy(argv)
    except (ArtifactError, ValueError, ResourceError) as e:  # a bad --model or setting, before anything starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    if launch.detach or on_cluster:
        return 0  # on a cluster Serve keeps the application running
    return serve_until_stopped()


if __name__ == "__main__":
    sys.exit(main())
