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

Every application setting (kdlib.serve.api.ServeArgs, the `args:` of a Serve config) is also a flag here,
named after its field (`--max-batch-size`), with its default and description: see --help.

Running it again with a new --model on the same cluster (or port) updates the running application
without downtime: new replicas load and verify the new artifact before the old ones stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pydantic import BaseModel, ConfigDict, Field

from kdlib.artifact import ArtifactError
from kdlib.cluster import init_ray
from kdlib.serve.api import ServeArgs
from kdlib.serve.model import resolve_model_location
from kdlib.settings_flags import add_flags, flag_values

APP_NAME = "kdlib"
# Every ServeArgs field is a flag but model_dir, which --model gives: a run folder or URI, resolved first.
NOT_FLAGS = ("model_dir",)


class Launch(BaseModel):
    """This job's own settings; the application's are ServeArgs, which the replicas receive."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="run folder (with results.json) or model artifact folder, or a storage URI")
    host: str = Field("127.0.0.1", description="bind address of the HTTP proxy (0.0.0.0: all interfaces)")
    port: int = Field(8000, description="HTTP port")
    detach: bool = Field(False, description="return once deployed instead of waiting for Ctrl-C")


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


def deploy(argv: list[str] | None = None) -> str:
    """Start (or update) the application; returns its base URL."""
    from ray import serve

    from kdlib.serve.app import build_app

    launch, flags = parse_args(argv)
    args = serve_args(launch, flags)
    init_ray(None, None)
    serve.start(http_options={"host": launch.host, "port": launch.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{launch.host}:{launch.port}"
    print(f"[serve] {APP_NAME}: {args.model_dir} ({args.quantize}) at {url}/v1/predict "
          f"({'bearer token required' if args.require_token else 'no token'})")
    return url


def main(argv: list[str] | None = None) -> int:
    detach = parse_args(argv)[0].detach or bool(os.environ.get("RAY_ADDRESS"))
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
