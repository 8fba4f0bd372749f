"""A bounded HTTP load test: threads send JSON POSTs until `total` requests or `max_seconds`, then stop."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np


def run_load_test(url: str, payloads: list[dict], concurrency: int = 4, total: int = 200, *,
                  token: str | None = None, timeout_s: float = 30.0, max_seconds: float = 120.0,
                  on_response=None, stop: threading.Event | None = None) -> dict:
    """Send `total` POSTs of `payloads` (round-robin) to `url` from `concurrency` threads with keep-alive.

    Args:
        url: e.g. "http://127.0.0.1:8000/v1/predict".
        payloads: request bodies, cycled through.
        concurrency: client threads, each with its own connection.
        total: requests to send in all; the test also stops after `max_seconds`.
        token: sent as `Authorization: Bearer <token>` when given.
        on_response: optional callback(payload, status, parsed body or None) called from the threads.
        stop: optional event that ends the test early when set (it always ends by `total` or `max_seconds`).
    Returns:
        {"requests", "errors" (non-200 or transport failures), "status_counts", "error_samples",
         "requests_per_s", "p50_ms", "p99_ms", "mean_ms", "wall_s"}.
    """
    parts = urlsplit(url)
    path = parts.path or "/"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    bodies = [json.dumps(p).encode() for p in payloads]
    counter, lock = itertools.count(), threading.Lock()
    latencies, statuses, samples = [], {}, []
    deadline = time.monotonic() + max_seconds

    def worker():
        conn = None
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            i = next(counter)
            if i >= total:
                break
            start = time.perf_counter()
            status, parsed = 0, None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
                conn.request("POST", path, body=bodies[i % len(bodies)], headers=headers)
                status, parsed = read_answer(conn)
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn, parsed = None, {"transport_error": repr(e)}
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200 and len(samples) < 5:
                    samples.append({"status": status, "body": parsed})
            if on_response is not None:
                on_response(payloads[i % len(payloads)], status, parsed)
        if conn is not None:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": sum(v for k, v in statuses.items() if k != 200),
            "status_counts": {str(k): v for k, v in sorted(statuses.items())}, "error_samples": samples,
            "requests_per_s": len(latencies) / wall if wall > 0 else float("nan"),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()), "wall_s": wall}


def read_answer(conn: http.client.HTTPConnection) -> tuple[int, object]:
    """(HTTP status, the body parsed as JSON, or None when it is not JSON) of the connection's pending answer."""
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, None
