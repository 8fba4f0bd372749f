"""Serve a merged multi-task model over HTTP with Ray Serve (POST /v1/predict, GET /v1/tasks, /healthz).

Locally (embedded Ray, 127.0.0.1:8000; Ctrl-C stops it):
    python jobs/serve.py --model runs/demo                      # a run folder (its results.json) or a model folder
    python jobs/serve.py --model runs/demo/model --port 8001 --quantize int8
    python jobs/serve.py --model "s3://bucket/kdlib/demo"    # a run in remote storage: each replica mirrors it
    KDLIB_SERVE_TOKEN=$(cat ~/.kdlib_token) python jobs/serve.py --model runs/demo   # bearer token required
On a running cluster (the application keeps running after the job exits; the model must be readable from
every node: a storage URI, or a path on a shared disk; the token set in the nodes' environment or given as a file they mount):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/serve.py --model $PWD/runs/demo
Declaratively, with live model updates through user_config: serve deploy configs/serve/serve_config.yaml

Running it again with a new --model on the same cluster (or port) updates the running application
without downtime: new replicas load and verify the new artifact before the old ones stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kdlib.artifact import ArtifactError
from kdlib.cluster import init_ray
from kdlib.serve.api import ServeArgs
from kdlib.serve.model import resolve_model_location

APP_NAME = "kdlib"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder (with results.json) or model artifact folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the HTTP proxy (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic int8 linear layers")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--max-batch-size", type=int, default=64, help="inputs per batch across concurrent requests")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    p.add_argument("--max-inputs-per-request", type=int, default=64)
    p.add_argument("--token-file", default=None, help="file holding the bearer token (else $KDLIB_SERVE_TOKEN)")
    p.add_argument("--detach", action="store_true", help="return once deployed instead of waiting for Ctrl-C")
    return p.parse_args(argv)


def serve_args(ns: argparse.Namespace) -> dict:
    """Validated application args; the model folder absolute, the token required when one is configured here."""
    args = ServeArgs(model_dir=resolve_model_location(ns.model), quantize=ns.quantize, num_replicas=ns.num_replicas,
                     num_cpus=ns.num_cpus, max_batch_size=ns.max_batch_size,
                     batch_wait_timeout_s=ns.batch_wait_timeout_s, max_inputs_per_request=ns.max_inputs_per_request,
                     token_file=os.path.abspath(ns.token_file) if ns.token_file else None)
    # A token set for this launch must not silently vanish because a replica's environment lacks it.
    args.require_token = bool(ns.token_file or os.environ.get(args.token_env))
    return args.model_dump()


def deploy(argv: list[str] | None = None) -> str:
    """Start (or update) the application; returns its base URL."""
    from ray import serve

    from kdlib.serve.app import build_app

    ns = parse_args(argv)
    args = serve_args(ns)
    init_ray(None, None)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{ns.host}:{ns.port}"
    print(f"[serve] {APP_NAME}: {args['model_dir']} ({ns.quantize}) at {url}/v1/predict "
          f"({'bearer token required' if args['require_token'] else 'no token'})")
    return url


def main(argv: list[str] | None = None) -> int:
    detach = parse_args(argv).detach or bool(os.environ.get("RAY_ADDRESS"))
    try:
        deploy(argv)
    except (ArtifactError, ValueError) as e:  # a bad --model or setting, before anything starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    if detach:
        return 0  # on a cluster Serve keeps the application running
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
