"""A bounded HTTP load test: threads send JSON POSTs until `total` requests or `max_seconds`, then stop."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np


def run_load_test(url: str, payloads: list, concurrency: int = 4, total: int = 200, *,
                  token: str | None = None, timeout_s: float = 30.0, max_seconds: float = 120.0,
                  check=None, on_response=None, stop: threading.Event | None = None) -> dict:
    """Send `total` requests (cycling through `payloads`) from `concurrency` threads with keep-alive, then stop.

    A request is one POST, or several sent at once: a payload is either a JSON body, POSTed to `url`, or a list
    of (path, body) calls, each POSTed to `url`'s path + path on its own connection, all of them out before
    any answer is read (an all-task request to one deployment per task: one call per task). A request's
    latency runs until its slowest call has answered; it is an error if any of its calls is.

    Args:
        url: e.g. "http://127.0.0.1:8000/v1/predict", or the base "http://127.0.0.1:8000" for (path, body) calls.
        payloads: request bodies or lists of (path, body) calls, cycled through.
        concurrency: client threads, each with its own connections.
        total: requests to send in all; the test also stops after `max_seconds`.
        token: sent as `Authorization: Bearer <token>` when given.
        check: optional check(body, status, parsed body or None) -> what is wrong with the answer to one
            call, or None; by default any status but 200 (a transport failure is status 0).
        on_response: optional callback(body, status, parsed body or None) called per call from the threads.
        stop: optional event that ends the test early when set (it always ends by `total` or `max_seconds`).
    Returns:
        latency_summary(...) (its inputs per request: the `inputs` of each request's first call, 1 without)
        plus "status_counts" (per call), "error_samples" ({"path", "status", "problem"}, the first 5) and
        "latencies_ms" (per request).
    """
    parts = urlsplit(url)
    host, port, base = parts.hostname, parts.port or 80, parts.path.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    check = check or status_problem

    def calls_of(payload) -> list[tuple[str, bytes, dict]]:  # (path, encoded body, body) per call
        pairs = payload if isinstance(payload, list) else [("", payload)]
        return [((base + path) or "/", json.dumps(body).encode(), body) for path, body in pairs]

    requests = [calls_of(p) for p in payloads]
    width = max(len(calls) for calls in requests)
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    samples: list[dict] = []
    failed = [0]
    deadline = time.monotonic() + max_seconds

    def worker():
        conns: list[http.client.HTTPConnection | None] = [None] * width

        def drop(j: int, e: Exception) -> dict:
            if conns[j] is not None:
                conns[j].close()
            conns[j] = None
            return {"transport_error": repr(e)}

        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            i = next(counter)
            if i >= total:
                break
            calls = requests[i % len(requests)]
            start = time.perf_counter()
            unsent: list[dict | None] = []
            for j, (path, raw, _) in enumerate(calls):  # every call out before any answer is read
                try:
                    if conns[j] is None:
                        conns[j] = http.client.HTTPConnection(host, port, timeout=timeout_s)
                    conns[j].request("POST", path, body=raw, headers=headers)
                    unsent.append(None)
                except (OSError, http.client.HTTPException) as e:
                    unsent.append(drop(j, e))
            answers = []
            for j, (path, _, body) in enumerate(calls):
                status, parsed = 0, unsent[j]
                if parsed is None:
                    try:
                        status, parsed = read_answer(conns[j])
                    except (OSError, http.client.HTTPException) as e:
                        parsed = drop(j, e)
                answers.append((path, body, status, parsed))
            elapsed = (time.perf_counter() - start) * 1000
            problems = [(path, status, check(body, status, parsed)) for path, body, status, parsed in answers]
            problems = [p for p in problems if p[2] is not None]
            with lock:
                latencies.append(elapsed)
                for _, _, status, _ in answers:
                    statuses[status] = statuses.get(status, 0) + 1
                if problems:
                    failed[0] += 1
                    if len(samples) < 5:
                        path, status, problem = problems[0]
                        samples.append({"path": path, "status": status, "problem": problem})
            if on_response is not None:
                for _, body, status, parsed in answers:
                    on_response(body, status, parsed)
        for c in conns:
            if c is not None:
                c.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    sent = requests[:min(total, len(requests))]
    inputs = np.mean([len(calls[0][2].get("inputs", [None])) for calls in sent])
    calls = np.mean([len(c) for c in sent])
    return {**latency_summary(latencies, failed[0], wall, inputs_per_request=float(inputs),
                              calls_per_request=float(calls)),
            "status_counts": {str(k): v for k, v in sorted(statuses.items())}, "error_samples": samples,
            "latencies_ms": latencies}


def latency_summary(latencies_ms: list[float], errors: int, wall_s: float, *, inputs_per_request: float = 1.0,
                    calls_per_request: float = 1.0) -> dict:
    """Throughput and latency percentiles of one load test (latencies in ms, one per request)."""
    lat = np.asarray(latencies_ms, dtype=float)
    n = int(lat.size)
    rate = n / wall_s if n and wall_s > 0 else 0.0
    p50, p99 = (float(x) for x in np.percentile(lat, [50, 99])) if n else (float("nan"), float("nan"))
    return {"requests": n, "errors": int(errors), "wall_s": float(wall_s), "requests_per_s": rate,
            "inputs_per_s": rate * inputs_per_request, "http_requests_per_s": rate * calls_per_request,
            "p50_ms": p50, "p99_ms": p99, "mean_ms": float(lat.mean()) if n else float("nan"),
            "max_ms": float(lat.max()) if n else float("nan")}


def read_answer(conn: http.client.HTTPConnection) -> tuple[int, object]:
    """(HTTP status, the body parsed as JSON, or None when it is not JSON) of the connection's pending answer."""
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, None


def status_problem(body: dict, status: int, parsed) -> str | None:
    """The default check: an answer is wrong when its status is not 200 (what it was, and the start of its body)."""
    if status == 200:
        return None
    return f"HTTP {status}: {json.dumps(parsed)[:300] if parsed is not None else '(no JSON body)'}"
