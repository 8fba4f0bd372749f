"""The Ray Serve application: one deployment, a FastAPI ingress, dynamic batching across requests.

    serve run kdlib.serve.app:build_app model_dir=/abs/runs/demo      # or python jobs/serve.py
    serve deploy configs/serve/serve_config.yaml                       # a running cluster

Routes: POST /v1/predict, GET /v1/tasks, GET /v1/stats (this replica's counters), GET /healthz
(open, no model data). Concurrent requests queue into `@serve.batch`, sized in inputs, so requests for
different tasks share one trunk pass (kdlib.serve.model.ServedModel.run).

Live updates: the model folder is the deployment's `user_config`. `serve deploy` with a changed
`user_config` calls `reconfigure` on the running replicas (no restart); `serve.run` with a new model
replaces the replicas in a rolling update that starts the new ones before stopping the old ones
(`max_surge_percent=100`). Either way the new model is loaded and its checksums verified before a
single reference swap, so no request waits on or fails during the update.
"""

# No `from __future__ import annotations`: FastAPI must see the route parameters' real types
# (Request), which Serve's class-based ingress leaves unresolved when they are strings.
import asyncio
import logging
import os
import time
from collections import Counter as Tally

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from kdlib.device import describe, device
from kdlib.serve.api import (ClientError, Limits, ServeArgs, UserConfig, check_bearer, check_media_type,
                             parse_predict, printable, read_token, unknown_tasks)
from kdlib.serve.model import Job, ModelSlot

logger = logging.getLogger("ray.serve")
DEPLOYMENT = "KdlibServer"
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

app = FastAPI(title="kdlib multi-task model", description="Merged multi-task distilled BERT over Ray Serve.")
ROUTES = "POST /v1/predict, GET /v1/tasks, GET /v1/stats, GET /healthz"


@app.exception_handler(HTTPException)
async def routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    """A wrong path or method answered in the API's error format ({"error": ...}), naming what was asked."""
    path = printable(request.url.path)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {path}; use {allowed}"
    elif exc.status_code == 404:
        message = f"no route {request.method} {path}; the routes are {ROUTES}"
    else:
        message = f"{request.method} {path}: {exc.detail}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past `limit` bytes (never held whole)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def count_inputs(jobs: list[Job]) -> int:
    """Batch size in inputs: a request with 40 texts weighs 40."""
    return sum(len(j.texts) for j in jobs)


@serve.deployment(name=DEPLOYMENT, max_surge_percent=100)
@serve.ingress(app)
class KdlibServer:
    """One replica: the current model version, the batcher, the replica's counters and metrics."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.token = read_token(self.args.token_env, self.args.token_file)
        if self.token is None and self.args.require_token:
            raise RuntimeError(f"require_token is set but neither ${self.args.token_env} nor token_file gives a "
                               "token in this replica's environment")
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.device = device()  # the GPU Ray assigned this replica (num_gpus), else the CPU
        # A replica that asked for a GPU and sees none serves on the CPU and says so in /healthz (503), so that
        # a load balancer's health check takes it out, instead of the replica failing in a restart loop.
        self.gpu_error = None
        if self.args.num_gpus > 0 and self.device.type != "cuda":
            self.gpu_error = (f"this replica asked Ray for {self.args.num_gpus:g} GPU (num_gpus) but sees no CUDA "
                              f"device (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): serving on the CPU")
            logger.error(self.gpu_error)
        self.slot = ModelSlot(self.args.tokenizer_path, device=self.device, precision=self.args.precision)
        self._infer.set_max_batch_size(self.args.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.stats = {"requests": 0, "batches": 0, "inputs": 0, "max_batch_requests": 0, "max_batch_inputs": 0,
                      "max_batch_tasks": 0, "batch_requests": Tally(), "model_loads": 0,
                      "replica": serve.get_replica_context().replica_id.unique_id}
        self.m_requests = Counter("kdlib_serve_requests", "HTTP requests by route and status code.",
                                  tag_keys=("route", "code"))
        self.m_latency = Histogram("kdlib_serve_latency_ms", "Request latency in milliseconds.",
                                   boundaries=LATENCY_MS, tag_keys=("route",))
        self.m_batch = Histogram("kdlib_serve_batch_inputs", "Inputs per model batch.", boundaries=BATCH_SIZES)
        self.m_task_inputs = Counter("kdlib_serve_task_inputs", "Inputs answered per task.", tag_keys=("task",))

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this at start and on every user_config change; the swap happens once the new
        artifact has loaded and verified. A failed update keeps serving the current version (reported by
        /healthz and /v1/tasks as `last_update_error`); a failed first load fails the replica."""
        cfg = UserConfig.model_validate(user_config)
        outcome = self.slot.update(cfg.model_dir, cfg.quantize)
        if outcome == "loaded":
            self.stats["model_loads"] += 1
            logger.info(f"serving {self.slot.current.version} from {self.slot.current.model_dir}")
        elif outcome == "refused":
            logger.error(f"update to {cfg.model_dir} refused, still serving {self.slot.current.version}: "
                         f"{self.slot.last_error}")

    # --- routes ---------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        model = self.slot.current
        body = {"status": "ok" if model else "no model", "model_version": model.version if model else None,
                "last_update_error": self.slot.last_error, "device": describe(self.device),
                "precision": self.args.precision}
        if self.gpu_error:
            return JSONResponse({**body, "status": "no gpu", "gpu_error": self.gpu_error}, status_code=503)
        return body

    @app.get("/v1/tasks")
    async def tasks(self, request: Request):
        return await self._handle("/v1/tasks", request, self._describe)

    @app.get("/v1/stats")
    async def batch_stats(self, request: Request):
        return await self._handle("/v1/stats", request, self._stats)

    @app.post("/v1/predict")
    async def predict(self, request: Request):
        return await self._handle("/v1/predict", request, self._predict)

    # --- implementation -------------------------------------------------------------------------------

    async def _handle(self, route: str, request: Request, body_fn) -> JSONResponse:
        start, code = time.perf_counter(), 200
        try:
            check_bearer(request.headers.get("authorization"), self.token)
            if self.slot.current is None:
                code = 503
                return JSONResponse({"error": "no model loaded", "last_update_error": self.slot.last_error}, 503)
            return JSONResponse(await body_fn(request))
        except ClientError as e:
            code = e.status
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        except Exception:
            code = 500
            raise
        finally:
            self.m_requests.inc(tags={"route": route, "code": str(code)})
            self.m_latency.observe((time.perf_counter() - start) * 1000, tags={"route": route})

    async def _describe(self, request: Request) -> dict:
        return {**self.slot.current.describe(), "last_update_error": self.slot.last_error}

    async def _stats(self, request: Request) -> dict:
        s = dict(self.stats)
        s["batch_requests"] = {str(k): v for k, v in sorted(s["batch_requests"].items())}
        return {**s, "max_batch_size": self.args.max_batch_size,
                "batch_wait_timeout_s": self.args.batch_wait_timeout_s}

    async def _predict(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.args.max_body_bytes:
            raise ClientError(413, f"request body of {length} bytes exceeds the limit of {self.args.max_body_bytes}")
        check_media_type(request.headers.get("content-type"), request.headers.get("content-encoding"))
        limits = Limits(self.args.max_body_bytes, self.args.max_inputs_per_request, self.args.max_text_chars,
                        {name: info["pair"] for name, info in self.slot.current.tasks.items()})
        req = parse_predict(await read_body(request, self.args.max_body_bytes), limits)
        job = Job([x.text for x in req.inputs], [x.text_pair for x in req.inputs], req.task_names())
        version, results = await self._infer(job)
        if results and isinstance(results[0], str):  # the tasks went away in a live update meanwhile
            raise unknown_tasks(results, list(self.slot.current.tasks))
        for t in job.tasks:
            self.m_task_inputs.inc(len(job.texts), tags={"task": t})
        return {"model_version": version, "tasks": list(job.tasks), "results": results}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=count_inputs)
    async def _infer(self, jobs: list[Job]) -> list[tuple[str, list]]:
        """A batch of requests (any mix of tasks) -> per request (model version, answers)."""
        model = self.slot.current  # one version for the whole batch, even if an update lands meanwhile
        n = count_inputs(jobs)
        s = self.stats
        s["requests"] += len(jobs)
        s["batches"] += 1
        s["inputs"] += n
        s["max_batch_requests"] = max(s["max_batch_requests"], len(jobs))
        s["max_batch_inputs"] = max(s["max_batch_inputs"], n)
        s["max_batch_tasks"] = max(s["max_batch_tasks"], len({t for j in jobs for t in j.tasks}))
        s["batch_requests"][len(jobs)] += 1
        self.m_batch.observe(n)
        results = await asyncio.to_thread(model.infer, jobs)  # torch off the event loop
        return [(model.version, r) for r in results]


def build_app(args: ServeArgs | dict) -> serve.Application:
    """Serve application builder (`import_path: kdlib.serve.app:build_app`).

    Args:
        args: ServeArgs, or its fields as a dict: a Serve config's `args:`, or `serve run`'s `key=value`
            strings, which validate into the same types. `model_dir` (absolute, reachable from every replica)
            and `quantize` become the deployment's user_config; a Serve config file may give user_config
            instead, which makes a later change of model a live `reconfigure`. The replicas receive the
            validated ServeArgs.
    """
    a = ServeArgs.model_validate(args or {})
    options = dict(num_replicas=a.num_replicas, max_ongoing_requests=a.max_ongoing_requests,
                   ray_actor_options={"num_cpus": a.num_cpus, **({"num_gpus": a.num_gpus} if a.num_gpus else {})})
    if a.model_dir is not None:
        options["user_config"] = UserConfig(model_dir=a.model_dir, quantize=a.quantize).model_dump()
    return KdlibServer.options(**options).bind(a)
