"""The serving benchmark's pieces (jobs/benchmarks/serve.py) without Ray: request building, answer checks,
latency statistics, the setup comparison; and the load test (kdlib/serve/loadtest.py), one call or several
per request, against a stdlib HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest

from conftest import benchmark_module

from kdlib.cluster import free_port
from kdlib.serve.loadtest import latency_summary, run_load_test

bench = benchmark_module("serve")
compare_setups, pool_rounds, request_units = bench.compare_setups, bench.pool_rounds, bench.request_units
response_problem, rotated = bench.response_problem, bench.rotated

INPUTS = {"a": [{"text": f"a{i}"} for i in range(5)],
          "b": [{"text": f"b{i}", "text_pair": f"p{i}"} for i in range(3)]}


def test_latency_summary():
    lat = [float(x) for x in range(1, 101)]  # 1..100 ms
    s = latency_summary(lat, errors=2, wall_s=4.0, inputs_per_request=8, calls_per_request=3)
    assert s["requests"] == 100 and s["errors"] == 2
    assert s["requests_per_s"] == 25.0 and s["inputs_per_s"] == 200.0 and s["http_requests_per_s"] == 75.0
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5) and s["max_ms"] == 100.0
    empty = latency_summary([], errors=0, wall_s=1.0)
    assert empty["requests"] == 0 and empty["requests_per_s"] == 0.0 and np.isnan(empty["p99_ms"])


def test_rounds_are_pooled_and_rotated():
    a = {**latency_summary([10.0, 20.0], 0, 1.0, inputs_per_request=8, calls_per_request=3),
         "latencies_ms": [10.0, 20.0], "status_counts": {"200": 6}, "error_samples": []}
    b = {**latency_summary([30.0, 40.0, 50.0], 1, 2.0, inputs_per_request=8, calls_per_request=3),
         "latencies_ms": [30.0, 40.0, 50.0], "status_counts": {"200": 8, "500": 1},
         "error_samples": [{"status": 500}]}
    r = pool_rounds([a, b])
    assert r["requests"] == 5 and r["errors"] == 1 and r["wall_s"] == 3.0 and r["rounds"] == 2
    assert r["requests_per_s"] == pytest.approx(5 / 3) and r["inputs_per_s"] == pytest.approx(40 / 3)
    assert r["http_requests_per_s"] == pytest.approx(5.0) and r["p50_ms"] == 30.0
    assert r["round_requests_per_s"] == [2.0, 1.5] and r["status_counts"] == {"200": 14, "500": 1}
    assert r["error_samples"] == [{"status": 500}] and "latencies_ms" not in r
    assert [rotated("xyz", k) for k in range(4)] == [list("xyz"), list("yzx"), list("zxy"), list("xyz")]


def test_request_units_give_every_setup_the_same_inputs():
    merged = request_units("single", 2, INPUTS, 5, merged_prefix="/m")
    per_task = request_units("single", 2, INPUTS, 5, task_prefixes={"a": "/t/a", "b": "/t/b"})
    # Tasks in turn; each task's inputs consecutive, wrapping around its dev set.
    assert [u[0][1] for u in merged] == [
        {"task": "a", "inputs": INPUTS["a"][0:2]}, {"task": "b", "inputs": INPUTS["b"][0:2]},
        {"task": "a", "inputs": INPUTS["a"][2:4]}, {"task": "b", "inputs": [INPUTS["b"][2], INPUTS["b"][0]]},
        {"task": "a", "inputs": [INPUTS["a"][4], INPUTS["a"][0]]}]
    assert all(u[0][0] == "/m/v1/predict" for u in merged)
    assert [[c for c in u] for u in per_task] == [[(f"/t/{b['task']}/v1/predict", b)] for (_, b), in merged]

    # All tasks on the pair task's inputs (a pair task needs its pair); the single-sentence task's own
    # deployment gets the first sentences alone.
    all_merged = request_units("all", 3, INPUTS, 2, merged_prefix="/m")
    all_per_task = request_units("all", 3, INPUTS, 2, task_prefixes={"a": "/t/a", "b": "/t/b"})
    assert all_merged == [[("/m/v1/predict", {"tasks": ["a", "b"], "inputs": INPUTS["b"][:3]})],
                          [("/m/v1/predict", {"tasks": ["a", "b"], "inputs": INPUTS["b"][:3]})]]
    for m, p in zip(all_merged, all_per_task):  # one call per task, all on the merged request's inputs
        assert [path for path, _ in p] == ["/t/a/v1/predict", "/t/b/v1/predict"]
        assert [body["task"] for _, body in p] == ["a", "b"]
        assert p[1][1]["inputs"] == m[0][1]["inputs"]
        assert p[0][1]["inputs"] == [{"text": r["text"]} for r in m[0][1]["inputs"]]
    with pytest.raises(ValueError):
        request_units("all", 1, INPUTS, 1)
    with pytest.raises(ValueError):
        request_units("all", 1, INPUTS, 1, merged_prefix="/m", task_prefixes={"a": "/a", "b": "/b"})


def test_response_problem():
    body = {"tasks": ["a", "b"], "inputs": [{"text": "x"}, {"text": "y"}]}
    good = {"results": [{"a": {}, "b": {}}, {"a": {}, "b": {}}]}
    assert response_problem(body, 200, good) is None
    assert response_problem(body, 503, {"error": "no model"}).startswith("HTTP 503")
    assert response_problem(body, 0, {"transport_error": "ConnectionResetError()"}).startswith("HTTP 0")
    assert "expected 2 results" in response_problem(body, 200, {"results": [{"a": {}, "b": {}}]})
    assert "expected 2 results" in response_problem(body, 200, None)
    assert "lacks ['b']" in response_problem(body, 200, {"results": [{"a": {}, "b": {}}, {"a": {}}]})
    assert response_problem({"task": "a", "inputs": [{"text": "x"}]}, 200, {"results": [{"a": {}}]}) is None


def _run(setup, kind, batch, rps, errors=0, p99=10.0, requests=100, expected=100):
    return {"setup": setup, "kind": kind, "batch": batch, "requests_per_s": rps, "errors": errors, "p99_ms": p99,
            "requests": requests, "expected_requests": expected}


def test_compare_setups_and_targets():
    speeds = {"merged": 30.0, "merged_int8": 45.0, "per_task": 10.0, "cmow": 120.0}
    runs = [_run(s, k, b, v / b) for b in (1, 8) for k in ("single", "all") for s, v in speeds.items()]
    c = compare_setups(runs)
    assert c["gains"]["all_b8"] == {"merged_vs_per_task": pytest.approx(3.0), "int8_vs_float": pytest.approx(1.5),
                                    "cmow_vs_per_task": pytest.approx(12.0), "cmow_vs_merged": pytest.approx(4.0)}
    assert c["targets"]["met"] == {"all_task_gain": True, "zero_errors": True, "p99_reported": True}
    assert c["targets"]["all_met"] and c["errors"] == 0 and c["incomplete"] == []

    # 1.9x on all-task requests at batch 1, an error, a test stopped short, a missing p99: all reported.
    runs[4] = _run("merged", "all", 1, 19.0, errors=1)
    runs[-2] = _run("per_task", "all", 8, 1.25, p99=float("nan"), requests=90)
    c = compare_setups(runs)
    assert c["gains"]["all_b1"]["merged_vs_per_task"] == pytest.approx(1.9)
    assert c["errors"] == 1 and c["incomplete"] == ["per_task/all/b8"]
    assert c["targets"]["met"] == {"all_task_gain": False, "zero_errors": False, "p99_reported": False}
    assert not c["targets"]["all_met"]


def test_round_gains_give_the_median_and_spread_and_decide_the_target():
    speeds = {"merged": 30.0, "merged_int8": 45.0, "per_task": 10.0, "cmow": 120.0}
    runs = [_run(s, k, b, v / b) for b in (1, 8) for k in ("single", "all") for s, v in speeds.items()]
    by = {(r["setup"], r["kind"], r["batch"]): r for r in runs}
    # Five rounds of all-task batch 1: one lucky round for the merged model lifts the pooled ratio above 2x
    # (pooled 2.1x), while three of five rounds are below: the median round (1.9x) decides.
    by[("merged", "all", 1)].update(requests_per_s=21.0, round_requests_per_s=[19.0, 18.0, 19.5, 30.0, 21.0])
    by[("per_task", "all", 1)].update(requests_per_s=10.0, round_requests_per_s=[10.0, 10.0, 10.0, 10.0, 10.0])
    c = compare_setups(runs)
    assert c["gains"]["all_b1"]["merged_vs_per_task"] == pytest.approx(2.1)
    assert c["round_gains"]["all_b1"] == {"merged_vs_per_task": pytest.approx([1.9, 1.8, 1.95, 3.0, 2.1]),
                                          "median": pytest.approx(1.95), "min": pytest.approx(1.8),
                                          "max": pytest.approx(3.0)}
    assert set(c["round_gains"]) == {"all_b1"}  # only where both setups carry rounds
    assert c["targets"]["met"]["all_task_gain"] is False
    by[("merged", "all", 1)]["round_requests_per_s"] = [21.0, 20.0, 22.0, 19.0, 25.0]  # median 2.1x: met
    assert compare_setups(runs)["targets"]["met"]["all_task_gain"] is True


class _Handler(BaseHTTPRequestHandler):
    """/slow/* answers after 0.2 s, /bad/* with a 500, anything else at once; answers name the asked tasks."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the Serve proxy
    calls: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.calls.append(self.path)
        if self.path.startswith("/slow"):
            time.sleep(0.2)
        tasks = [body["task"]] if "task" in body else body["tasks"]
        status = 500 if self.path.startswith("/bad") else 200
        out = {"error": "boom"} if status == 500 else {"results": [{t: {"score": 0.0} for t in tasks}
                                                                   for _ in body["inputs"]]}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_test_sends_a_requests_calls_at_once_and_stops_by_itself(http_server):
    units = request_units("all", 2, INPUTS, 4, task_prefixes={"a": "/slow/a", "b": "/slow/b"})
    r = run_load_test(http_server, units, concurrency=2, total=6, check=response_problem)
    assert r["requests"] == 6 and r["errors"] == 0 and r["status_counts"] == {"200": 12}
    assert len(_Handler.calls) == 12  # bounded: exactly total x calls, then it stopped
    # Both 0.2 s calls of a request run at once: its latency is the slowest call, not their sum.
    assert 195 <= r["p50_ms"] < 350 and r["max_ms"] < 390, r
    assert r["inputs_per_s"] == pytest.approx(2 * r["requests_per_s"])
    assert r["http_requests_per_s"] == pytest.approx(2 * r["requests_per_s"])

    mixed = request_units("all", 1, INPUTS, 2, task_prefixes={"a": "/fast/a", "b": "/bad/b"})
    r = run_load_test(http_server, mixed, concurrency=1, total=3, check=response_problem)
    assert r["requests"] == 3 and r["errors"] == 3 and r["status_counts"] == {"200": 3, "500": 3}
    assert r["error_samples"][0]["path"] == "/bad/b/v1/predict" and "HTTP 500" in r["error_samples"][0]["problem"]


def test_load_test_counts_transport_failures():
    port = free_port()  # nothing listens on it
    units = request_units("single", 1, INPUTS, 2, merged_prefix="/m")
    r = run_load_test(f"http://127.0.0.1:{port}", units, concurrency=2, total=4, timeout_s=5, check=response_problem)
    assert r["requests"] == 4 and r["errors"] == 4 and r["status_counts"] == {"0": 4}
    assert "transport_error" in r["error_samples"][0]["problem"]


def test_load_test_posts_plain_bodies_to_the_url_and_checks_the_status_by_default(http_server):
    bodies = [{"task": "a", "inputs": INPUTS["a"][:3]}, {"tasks": ["a", "b"], "inputs": INPUTS["b"][:1]}]
    seen = []
    r = run_load_test(http_server + "/fast/v1/predict", bodies, concurrency=2, total=5,
                      on_response=lambda body, status, parsed: seen.append((body["inputs"], status, len(parsed["results"]))))
    assert r["requests"] == 5 and r["errors"] == 0 and r["status_counts"] == {"200": 5}
    assert _Handler.calls == ["/fast/v1/predict"] * 5 and len(r["latencies_ms"]) == 5
    # inputs per request: the mean over the bodies it cycles through (3 and 1)
    assert r["inputs_per_s"] == pytest.approx(2 * r["requests_per_s"]) and r["http_requests_per_s"] == r["requests_per_s"]
    assert sorted((len(i), s, n) for i, s, n in seen) == [(1, 200, 1)] * 2 + [(3, 200, 3)] * 3

    r = run_load_test(http_server + "/bad/v1/predict", bodies[:1], concurrency=1, total=2)
    assert r["requests"] == 2 and r["errors"] == 2 and r["status_counts"] == {"500": 2}
    assert r["error_samples"][0] == {"path": "/bad/v1/predict", "status": 500, "problem": 'HTTP 500: {"error": "boom"}'}
