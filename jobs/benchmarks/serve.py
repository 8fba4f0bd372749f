"""`jobs/benchmark.py serve`: the merged model's Ray Serve endpoint against one deployment per task.

    python jobs/benchmark.py serve --scale quick [--data-dir ../shared/data/glue-mini] [--storage-root runs]

In one run, over loopback, with the same server code (kdlib.serve.app) for every deployment:

- **merged**: the glue-mini pipeline's merged model (configs/glue_mini.yaml, run in-process and cached
  under the storage root like `jobs/benchmark.py distill`), serving SST-2, MRPC and STS-B;
- **merged (int8)**: the same model with int8 dynamic quantization of its linear layers;
- **per-task**: one application per task serving that task's full teacher (the pretrained MiniLM's
  frozen bottom layers plus the best ensemble member's fine-tuned top layers and head: one member, a
  full 6-layer encoder pass per input);
- **CMOW**: the CMOW student distilled from the same teachers (the same pipeline with `student.kind=cmow`, as
  the students benchmark configures it), one multi-task model serving every task through the same API.

Every setup has the same replicas and CPUs: one replica per task, one torch thread each, the same Ray CPU
reservation. A bounded load test (fixed request count and concurrency; it stops by itself) sends
single-task requests (one task per request, the tasks in turn) and all-task requests (every task on the
same inputs: one request to the merged model; to the per-task setup one request to each task's
deployment, sent at once, the slowest answer being the request's latency), with 1 and 8 inputs per
request. For each kind of request and batch size the setups are measured in rounds, in turn, each round
starting with another setup, so load from elsewhere on the machine hits them alike. Reported: requests/s,
inputs/s, p50 and p99 latency, errors (a non-200 answer, a transport failure or an answer missing rows or
tasks), and the merged / per-task ratio of each round with its median and spread. Beside it, int8 against
float offline: time over the dev sets and the change of each task's dev score.

Targets (issue 6): all-task throughput of the merged model >= 2x the per-task deployments' (at both batch
sizes, the median round); zero errors; p99 reported for batch sizes 1 and 8.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import GLUE_MINI, distill_job, figure, grouped_bars, row_caps, save_figure
from kdlib.serve.loadtest import latency_summary, run_load_test, status_problem

SCALES = {  # train rows per task for the pipeline; measured requests per configuration and batch size
    "quick": {"train_rows": 1500, "requests": {1: 400, 8: 160}, "warmup": 16, "rounds": 5},
    "full": {"train_rows": None, "requests": {1: 2000, 8: 800}, "warmup": 32, "rounds": 5},
}
CONCURRENCY = 8  # client threads (each keeps its own keep-alive connections)
BATCH_SIZES = (1, 8)  # inputs per request
KINDS = ("single", "all")
SETUPS = ("merged", "merged_int8", "per_task", "cmow")
SETUP_LABELS = {"merged": "merged model (float)", "merged_int8": "merged model (int8)",
                "per_task": "one teacher deployment per task", "cmow": "CMOW student (multi-task)"}
MERGED_PREFIX = {"merged": "/merged", "merged_int8": "/merged-int8", "cmow": "/cmow"}  # one app for every task
# the CMOW student as jobs/benchmarks/students.py distils it (CBOW vectors from MiniLM's word embeddings)
CMOW = ["student.kind=cmow", "distill.lr=5e-4", "student.cbow_init=encoder", "student.cbow_dim=384"]
TARGET_ALL_TASK_GAIN = 2.0


# --- pure helpers ------------------------------------------------------------------------------------------


def request_units(kind: str, batch: int, inputs_by_task: dict[str, list[dict]], count: int, *,
                  merged_prefix: str | None = None, task_prefixes: dict[str, str] | None = None
                  ) -> list[list[tuple[str, dict]]]:
    """The requests of a load test, each a list of (path, JSON body) calls sent at once.

    Request i takes `batch` consecutive inputs from the dev inputs of a task (so every setup gets the same
    inputs in the same order). A single-task request asks task i mod T for its own inputs. An all-task
    request asks for every task on the inputs of a sentence-pair task in turn (pair tasks need the pair;
    a single-sentence task reads the first sentence): one call with `tasks` to the merged model
    (`merged_prefix`), or one call per task to each task's deployment (`task_prefixes`), where a
    single-sentence task's deployment gets the first sentences alone.
    """
    if (merged_prefix is None) == (task_prefixes is None):
        raise ValueError("give exactly one of merged_prefix or task_prefixes")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    tasks = list(inputs_by_task)
    pair_tasks = [t for t in tasks if inputs_by_task[t] and inputs_by_task[t][0].get("text_pair") is not None]
    sources = tasks if kind == "single" or not pair_tasks else pair_tasks
    units = []
    for i in range(count):
        source = sources[i % len(sources)]
        pool = inputs_by_task[source]
        start = (i // len(sources)) * batch
        rows = [pool[(start + k) % len(pool)] for k in range(batch)]
        if merged_prefix is not None:
            body = {"task": source, "inputs": rows} if kind == "single" else {"tasks": tasks, "inputs": rows}
            units.append([(f"{merged_prefix}/v1/predict", body)])
        else:
            asked = [source] if kind == "single" else tasks
            units.append([(f"{task_prefixes[t]}/v1/predict",
                           {"task": t, "inputs": rows if t in pair_tasks else [{"text": r["text"]} for r in rows]})
                          for t in asked])
    return units


def response_problem(body: dict, status: int, parsed) -> str | None:
    """What is wrong with the answer to one call (None: a 200 with one result per input, every task in each)."""
    if status != 200:
        return status_problem(body, status, parsed)
    results = parsed.get("results") if isinstance(parsed, dict) else None
    if not isinstance(results, list) or len(results) != len(body["inputs"]):
        return f"expected {len(body['inputs'])} results, got {json.dumps(parsed)[:300]}"
    tasks = [body["task"]] if "task" in body else body["tasks"]
    for i, r in enumerate(results):
        missing = [t for t in tasks if not isinstance(r, dict) or t not in r]
        if missing:
            return f"results[{i}] lacks {missing}"
    return None


def pool_rounds(parts: list[dict]) -> dict:
    """One summary of a configuration measured in several rounds: requests, errors and wall time added up,
    latencies pooled (each part as run_load_test returns it, with `latencies_ms`)."""
    latencies = [x for p in parts for x in p["latencies_ms"]]
    n = len(latencies)
    inputs = sum(p["inputs_per_s"] * p["wall_s"] for p in parts) / n if n else 0.0
    calls = sum(p["http_requests_per_s"] * p["wall_s"] for p in parts) / n if n else 0.0
    status: dict[str, int] = {}
    for p in parts:
        for k, v in p["status_counts"].items():
            status[k] = status.get(k, 0) + v
    return {**latency_summary(latencies, sum(p["errors"] for p in parts), sum(p["wall_s"] for p in parts),
                              inputs_per_request=inputs, calls_per_request=calls),
            "rounds": len(parts), "round_requests_per_s": [p["requests_per_s"] for p in parts],
            "status_counts": dict(sorted(status.items())),
            "error_samples": [e for p in parts for e in p["error_samples"]][:5]}


def rotated(items, k: int) -> list:
    """`items` rotated left by k: round k of a comparison starts with a different setup."""
    items = list(items)
    k %= len(items)
    return items[k:] + items[:k]


def compare_setups(runs: list[dict], batch_sizes=BATCH_SIZES, gain_target: float = TARGET_ALL_TASK_GAIN) -> dict:
    """Throughput ratios between setups per kind of request and batch size, and the targets.

    Args:
        runs: load-test summaries with `setup`, `kind`, `batch`, `requests_per_s`, `p99_ms`, `errors`,
            `requests` and `expected_requests`.
    Returns:
        {"gains": {"<kind>_b<batch>": {"merged_vs_per_task", "int8_vs_float", ...}} (pooled over rounds),
         "round_gains": {"<kind>_b<batch>": {"merged_vs_per_task": [one ratio per round], "median", "min",
         "max"}} (where the runs carry `round_requests_per_s`), "errors", "incomplete",
         "targets": {..., "met": {"all_task_gain", "zero_errors", "p99_reported"}, "all_met"}}; the all-task
        target is judged on the median round.
    """
    by = {(r["setup"], r["kind"], r["batch"]): r for r in runs}

    def ratio(a, b):
        if a is None or b is None or not b["requests_per_s"]:
            return float("nan")
        return a["requests_per_s"] / b["requests_per_s"]

    gains = {}
    for kind in KINDS:
        for b in batch_sizes:
            merged = by.get(("merged", kind, b))
            gains[f"{kind}_b{b}"] = {"merged_vs_per_task": ratio(merged, by.get(("per_task", kind, b))),
                                     "int8_vs_float": ratio(by.get(("merged_int8", kind, b)), merged),
                                     "cmow_vs_per_task": ratio(by.get(("cmow", kind, b)),
                                                               by.get(("per_task", kind, b))),
                                     "cmow_vs_merged": ratio(by.get(("cmow", kind, b)), merged)}
    # The same ratio round by round (the setups of one round ran back to back): its median and spread say how
    # much one lucky or unlucky stretch of time moved the pooled figure.
    rounds = {}
    for kind in KINDS:
        for b in batch_sizes:
            merged, per_task = by.get(("merged", kind, b)), by.get(("per_task", kind, b))
            pairs = list(zip(merged.get("round_requests_per_s", []), per_task.get("round_requests_per_s", []))
                         ) if merged and per_task else []
            ratios = [m / p for m, p in pairs if p]
            if ratios:
                rounds[f"{kind}_b{b}"] = {"merged_vs_per_task": ratios, "median": float(np.median(ratios)),
                                          "min": min(ratios), "max": max(ratios)}
    # The target is judged on the median round where rounds were recorded, else on the pooled ratio.
    all_task = [rounds[f"all_b{b}"]["median"] if f"all_b{b}" in rounds else gains[f"all_b{b}"]["merged_vs_per_task"]
                for b in batch_sizes]
    errors = sum(r["errors"] for r in runs)
    incomplete = [f"{r['setup']}/{r['kind']}/b{r['batch']}" for r in runs if r["requests"] < r["expected_requests"]]
    p99 = {b: [r["p99_ms"] for r in runs if r["batch"] == b] for b in batch_sizes}
    met = {"all_task_gain": bool(all_task) and all(g >= gain_target for g in all_task),
           "zero_errors": errors == 0 and not incomplete,
           "p99_reported": all(v and all(np.isfinite(v)) for v in p99.values())}
    return {"gains": gains, "round_gains": rounds, "errors": errors, "incomplete": incomplete,
            "targets": {"all_task_gain_at_least": gain_target, "errors": 0, "p99_batch_sizes": list(batch_sizes),
                        "met": met, "all_met": all(met.values())}}


def load_test(url: str, units: list[list[tuple[str, dict]]], total: int) -> dict:
    """`total` requests of `units` from CONCURRENCY client threads, every answer checked by response_problem."""
    return run_load_test(url, units, CONCURRENCY, total, check=response_problem, timeout_s=60.0, max_seconds=600.0)


# --- the benchmark -----------------------------------------------------------------------------------------


def measure_setups(url: str, setups: dict[str, dict], inputs_by_task: dict[str, list[dict]], settings: dict,
                   batch_sizes=BATCH_SIZES, log: str = "serve-bench") -> list[dict]:
    """Every kind of request at every batch size against every setup, in rounds taken in turn.

    Args:
        setups: {setup: request_units' keyword for where it is served (merged_prefix or task_prefixes)}.
        settings: {"requests": {batch: requests per setup}, "warmup": requests, "rounds": rounds}.
    Returns:
        one pool_rounds summary per setup, kind and batch size, with `setup`, `kind`, `batch` and
        `expected_requests` added.
    """
    runs, rounds = [], settings["rounds"]
    for batch in batch_sizes:
        per_round = -(-settings["requests"][batch] // rounds)
        for kind in KINDS:
            units, parts = {}, {setup: [] for setup in setups}
            for setup, where in setups.items():
                units[setup] = request_units(kind, batch, inputs_by_task, per_round * rounds, **where)
                load_test(url, units[setup], settings["warmup"])
            # Rounds in turn, each starting with another setup: load from elsewhere hits every setup alike.
            for k in range(rounds):
                for setup in rotated(setups, k):
                    share = units[setup][k * per_round:(k + 1) * per_round]
                    parts[setup].append(load_test(url, share, len(share)))
            for setup in setups:
                r = pool_rounds(parts[setup])
                r.update(setup=setup, kind=kind, batch=batch, expected_requests=per_round * rounds)
                runs.append(r)
                print(f"[{log}] {setup:11s} {kind:6s} b{batch}: {r['requests_per_s']:7.1f} req/s "
                      f"(rounds {' / '.join(f'{x:.1f}' for x in r['round_requests_per_s'])}), "
                      f"p50 {r['p50_ms']:6.1f} ms, p99 {r['p99_ms']:6.1f} ms, errors {r['errors']}", flush=True)
    return runs


def serve_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """Run the serving benchmark; returns {"result": JSON-able results, "table": Markdown} and writes
    `serve-<scale>.png` into `out`."""
    import ray

    from kdlib.cluster import init_ray
    from kdlib.serve.quantize import compare_float_int8

    settings = SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(None, None)  # a no-op when this process is already connected
    started = time.perf_counter()
    print("[serve-bench] glue-mini pipeline (cached stages are reused) ...", flush=True)
    models = glue_mini_models(scale, data_dir, storage_root)
    pipeline_s = time.perf_counter() - started
    tasks = models["tasks"]

    print("[serve-bench] int8 against float on the dev sets (offline) ...", flush=True)
    dev = {t: (d.dev["text"].tolist(), _pairs(d.dev), d.dev["label"].to_numpy()) for t, d in tasks.items()}
    int8 = compare_float_int8(models["merged_dir"], dev)

    inputs_by_task = {t: [{"text": x, **({"text_pair": p} if isinstance(p, str) else {})}
                          for x, p in zip(d.dev["text"].tolist(), d.dev["text_pair"].tolist())]
                      for t, d in tasks.items()}
    cpus = round(min(0.3, 0.9 * ray.cluster_resources().get("CPU", 1) / (len(SETUPS) * len(tasks))), 2)
    base = {"num_replicas": 1, "num_cpus": cpus, "torch_threads": 1, "max_batch_size": 64,
            "max_inputs_per_request": 64, "batch_wait_timeout_s": 0.005,
            "token_env": "KDLIB_SERVE_BENCH_TOKEN"}  # an unset variable: no token
    apps = {"bench-merged": ("/merged", {**base, "num_replicas": len(tasks), "model_dir": models["merged_dir"]}),
            "bench-merged-int8": ("/merged-int8", {**base, "num_replicas": len(tasks),
                                                   "model_dir": models["merged_dir"], "quantize": "int8"})}
    apps["bench-cmow"] = ("/cmow", {**base, "num_replicas": len(tasks), "model_dir": models["cmow_dir"]})
    task_prefixes = {t: f"/teacher/{t}" for t in tasks}
    for t, info in models["teachers"].items():
        apps[f"bench-teacher-{t}"] = (task_prefixes[t], {**base, "model_dir": info["dir"]})

    url, started_serve = serve_url()
    try:
        print(f"[serve-bench] deploying {len(apps)} applications at {url} ({cpus} CPU, 1 torch thread per "
              f"replica) ...", flush=True)
        t0 = time.perf_counter()
        deploy_apps(apps)
        deploy_s = time.perf_counter() - t0
        where = {setup: ({"task_prefixes": task_prefixes} if setup == "per_task"
                         else {"merged_prefix": MERGED_PREFIX[setup]}) for setup in SETUPS}
        runs = measure_setups(url, where, inputs_by_task, settings, BATCH_SIZES)
    finally:
        teardown_apps(list(apps), started_serve)

    comparison = compare_setups(runs)
    merged_manifest = models["merged_manifest"]
    layers = {"encoder": merged_manifest["encoder_config"]["num_hidden_layers"],
              "trunk": merged_manifest["trunk_depth"],
              "branches": {b["name"]: b["layers"] for b in merged_manifest["branches"]}}
    layers["all_task_merged"] = layers["trunk"] + sum(layers["branches"].values())
    layers["all_task_per_task"] = layers["encoder"] * len(tasks)
    quality = {}
    for t in tasks:
        s = models["run"]["scores"][t]
        quality[t] = {"metric": int8["tasks"][t]["metric"], "teacher_member": models["teachers"][t]["score"],
                      "merged_float": int8["tasks"][t]["float"], "merged_int8": int8["tasks"][t]["int8"],
                      "int8_delta": int8["tasks"][t]["delta"], "pipeline_student": s["primary"]["student"],
                      "cmow_student": models["cmow_run"]["scores"][t]["primary"]["student"]}
    result = {
        "benchmark": "serve", "scale": scale, "train_rows_per_task": settings["train_rows"],
        "settings": {"concurrency": CONCURRENCY, "requests": settings["requests"], "warmup": settings["warmup"],
                     "rounds": settings["rounds"],
                     "batch_sizes": list(BATCH_SIZES), "replicas_per_setup": len(tasks), "torch_threads": 1,
                     "ray_cpus_per_replica": cpus, "ray_cpus_per_setup": round(cpus * len(tasks), 2),
                     "cluster_cpus": ray.cluster_resources().get("CPU"), "max_length": merged_manifest["max_length"],
                     "batch_wait_timeout_s": base["batch_wait_timeout_s"], "url": url},
        "models": {"merged": {"dir": models["merged_dir"], "layers": layers, "overhead": models["run"]["overhead"]},
                   "cmow": {"dir": models["cmow_dir"], "parameters": models["cmow_run"].get("parameters")},
                   "teachers": models["teachers"]},
        "runs": runs, **comparison,
        "int8": {"offline": {k: int8[k] for k in ("float_s", "int8_s", "speedup", "rows")},
                 "served_gain": {k: v["int8_vs_float"] for k, v in comparison["gains"].items()},
                 "quality": quality},
        "seconds": {"pipeline": round(pipeline_s, 1), "deploy": round(deploy_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    table = _table(result)
    _plot(result, out / f"serve-{scale}.png")
    return {"result": result, "table": table}


def glue_mini_models(scale: str, data_dir: str, storage_root: str) -> dict:
    """The glue-mini pipeline's merged model (jobs/distill.py in-process; cached stages reused) and, per task,
    a servable artifact of its best teacher member as a full model (the encoder's frozen bottom layers, the
    member's fine-tuned top layers and head)."""
    from kdlib.artifact import read_manifest
    from kdlib.config import load_run_config
    from kdlib.pipeline.data import load_tasks

    config = str(GLUE_MINI)
    overrides = [f"data_dir={data_dir}", f"storage_root={storage_root}", f"run_name=bench_serve_{scale}"]
    overrides += row_caps(load_run_config(config, overrides).tasks, SCALES[scale]["train_rows"])
    assert distill_job()["main"]([config, *overrides]) == 0, "the glue-mini pipeline failed"
    cfg = load_run_config(config, overrides)
    root = Path(cfg.storage_root).expanduser().resolve()
    run = json.loads((root / cfg.run_name / "results.json").read_text())

    tasks = load_tasks(cfg)
    teachers = teacher_artifacts(cfg, run, tasks, root / "serve_bench" / "teachers")
    cmow_overrides = [*overrides[:2], f"run_name=bench_serve_{scale}_cmow", *overrides[3:], *CMOW]
    assert distill_job()["main"]([config, *cmow_overrides]) == 0, "the glue-mini CMOW pipeline failed"
    cmow_run = json.loads((root / f"bench_serve_{scale}_cmow" / "results.json").read_text())
    return {"run": run, "merged_dir": run["model_dir"], "merged_manifest": read_manifest(run["model_dir"]),
            "tasks": tasks, "teachers": teachers, "cmow_run": cmow_run, "cmow_dir": cmow_run["model_dir"]}


def teacher_artifacts(cfg, run: dict, tasks: dict, root: Path) -> dict:
    """Per task, a servable artifact of the run's best teacher member as a full model (the encoder's frozen
    bottom layers, the member's fine-tuned top layers and head), built once under `root` and reused.

    Args:
        cfg: the run's validated config (its teachers stage is cached: nothing is trained here).
        run: the run's results.json.
        tasks: the run's tasks (kdlib.pipeline.data.load_tasks(cfg)).
    Returns:
        {task: {"dir", "member", "score", "depth", "layers", "ensemble_dir"}}.
    """
    from kdlib.artifact import MANIFEST, read_manifest
    from kdlib.encoder import load_encoder, resolve_encoder_path
    from kdlib.pipeline.context import RunContext
    from kdlib.pipeline.teachers import train_teachers

    source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
    teacher_dirs = train_teachers(RunContext.create(cfg), tasks).dirs  # all cached by the run
    merged_manifest = read_manifest(run["model_dir"])
    encoder = None
    teachers = {}
    for name, data in tasks.items():
        members = run["scores"][name]["primary"]["members"]
        best = int(np.argmax(members))
        folder = root / f"{name}-{Path(teacher_dirs[name]).parent.name}-m{best}"
        if not (folder / MANIFEST).exists():
            if encoder is None:
                encoder = load_encoder(source, cfg.encoder.random_init, cfg.encoder.config_overrides, seed=cfg.seed)
            save_teacher(teacher_dirs[name], name, best, encoder, merged_manifest, folder, data.dev)
        manifest = read_manifest(folder, verify=False)
        spec = manifest["branches"][0]
        teachers[name] = {"dir": str(folder), "member": best, "score": members[best], "depth": spec["depth"],
                          "layers": spec["layers"], "ensemble_dir": teacher_dirs[name]}
    return teachers


def save_teacher(ensemble_dir: str, task: str, member: int, encoder, merged_manifest: dict, folder: Path,
                 dev=None) -> Path:
    """One ensemble member as a full single-task model artifact the server loads (branch named after the task,
    trunk weights included), checked against the ensemble's own outputs on a few dev rows."""
    from kdlib.artifact import load_model, save_model
    from kdlib.branched import BranchedModel, BranchSpec, member_name
    from kdlib.encoder import load_tokenizer
    from kdlib.predict import predict

    ensemble, manifest = load_model(ensemble_dir, encoder=encoder)
    src = ensemble.specs[member_name(task, member)]
    model = BranchedModel.from_encoder(encoder, [BranchSpec(task, src.kind, src.num_outputs, src.depth, src.layers)],
                                       ensemble.pooling)
    model.branches[task].load_state_dict(ensemble.branches[member_name(task, member)].state_dict())
    save_model(model.eval(), folder, tasks={task: manifest["tasks"][task]},
               extra={"role": "teacher", "member": member, "ensemble_dir": str(ensemble_dir),
                      "encoder": merged_manifest["encoder"], "max_length": merged_manifest["max_length"]})
    if dev is not None:
        rows = dev.iloc[:16]
        tokenizer = load_tokenizer(merged_manifest["encoder"]["source"])
        kw = {"max_length": merged_manifest["max_length"]}
        saved, _ = load_model(folder)
        a = predict(saved, tokenizer, rows["text"].tolist(), _pairs(rows), [task], **kw)[task]
        b = predict(ensemble, tokenizer, rows["text"].tolist(), _pairs(rows), [member_name(task, member)],
                    **kw)[member_name(task, member)]
        if not np.allclose(a, b, atol=1e-4):
            raise AssertionError(f"{folder}: the saved teacher differs from ensemble member {member} "
                                 f"(max diff {np.abs(a - b).max():.2e})")
    return folder


def _pairs(frame) -> list[str | None] | None:
    """A frame's text pairs, None for single-sentence rows (missing pairs may read as None or NaN)."""
    pairs = [p if isinstance(p, str) else None for p in frame["text_pair"].tolist()]
    return None if all(p is None for p in pairs) else pairs


def serve_url() -> tuple[str, bool]:
    """(base URL, whether Serve was started here): a running Serve keeps its HTTP options; otherwise Serve
    starts on a free port of 127.0.0.1."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from kdlib.cluster import free_port

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        http = client.get_serve_details().get("http_options") or {}
        host = http.get("host") or "127.0.0.1"
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}", False
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}", True


def deploy_apps(apps: dict[str, tuple[str, dict]]) -> None:
    """Every application at once (replicas load their models in parallel); returns once all are running."""
    from ray import serve

    from kdlib.serve.app import build_app

    serve.run_many([serve.RunTarget(build_app(args), name=name, route_prefix=prefix,
                                    logging_config={"enable_access_log": False})
                    for name, (prefix, args) in apps.items()])


def teardown_apps(names: list[str], started_serve: bool) -> None:
    from ray import serve

    for name in names:
        try:
            serve.delete(name)
        except Exception as e:  # noqa: BLE001 - clean up what can be cleaned up
            print(f"[serve-bench] could not delete {name}: {e}")
    if started_serve:
        serve.shutdown()


def _table(result: dict) -> str:
    from kdlib.scoring import markdown_table

    n_tasks = len(result["models"]["teachers"])
    kind_label = {"single": "single-task", "all": f"all-task ({n_tasks} tasks)"}
    rows = []
    for r in result["runs"]:
        rows.append([SETUP_LABELS[r["setup"]], kind_label[r["kind"]], r["batch"], r["requests_per_s"],
                     r["inputs_per_s"], r["p50_ms"], r["p99_ms"], f"{r['errors']} / {r['requests']}"])
    table = markdown_table(["setup", "request", "inputs / request", "requests/s", "inputs/s", "p50 ms", "p99 ms",
                            "errors / requests"], rows)
    s, g, lay = result["settings"], result["gains"], result["models"]["merged"]["layers"]
    rg = result.get("round_gains") or {}
    met = result["targets"]["met"]

    def yes(ok):
        return "met" if ok else "NOT met"

    table += (f"\n\n{s['concurrency']} client threads over loopback; every setup {s['replicas_per_setup']} replicas x "
              f"1 torch thread ({s['ray_cpus_per_setup']:g} Ray CPUs) on a {s['cluster_cpus']:g}-CPU Ray; requests per "
              f"configuration: {s['requests'][1]} at batch 1, {s['requests'][8]} at batch 8, in {s['rounds']} rounds taken in "
              f"turn with the other setups (order rotated), after {s['warmup']} warm-up requests. An all-task request to the per-task setup is {n_tasks} HTTP requests "
              f"sent at once (latency: the slowest).\n\n"
              f"All-task throughput, merged / per-task: " + ", ".join(
                  f"{g[f'all_b{b}']['merged_vs_per_task']:.2f}x (batch {b})" for b in s["batch_sizes"])
              + (", median round " + ", ".join(
                  f"{rg[f'all_b{b}']['median']:.2f}x ({rg[f'all_b{b}']['min']:.2f}-{rg[f'all_b{b}']['max']:.2f}x, "
                  f"batch {b})" for b in s["batch_sizes"]) if rg else "")
              + f" (layers run per input: {lay['all_task_merged']} against {lay['all_task_per_task']}, "
              f"{lay['all_task_per_task'] / lay['all_task_merged']:.2f}x); single-task: " + ", ".join(
                  f"{g[f'single_b{b}']['merged_vs_per_task']:.2f}x (batch {b})" for b in s["batch_sizes"])
              + ". CMOW student / per-task, all-task: " + ", ".join(
                  f"{g[f'all_b{b}']['cmow_vs_per_task']:.2f}x (batch {b})" for b in s["batch_sizes"])
              + f".\n\nTargets: all-task >= {result['targets']['all_task_gain_at_least']:g}x: {yes(met['all_task_gain'])}; "
              f"zero errors ({result['errors']}): {yes(met['zero_errors'])}; p99 for batch sizes 1 and 8: "
              f"{yes(met['p99_reported'])}.")
    q = result["int8"]
    qrows = [[t, v["metric"], v["teacher_member"], v["merged_float"], v["merged_int8"], v["int8_delta"],
              v.get("cmow_student", "-")] for t, v in q["quality"].items()]
    table += ("\n\nDev scores of what each setup serves; int8 dynamic quantization of the merged model:\n\n"
              + markdown_table(["task", "metric", "teacher member (per-task setup)", "merged float", "merged int8",
                                "int8 - float (points)", "CMOW student"], qrows)
              + f"\n\nOffline ({q['offline']['rows']} dev rows, batch 64, task by task): float "
                f"{q['offline']['float_s']:.1f} s, int8 {q['offline']['int8_s']:.1f} s "
                f"({q['offline']['speedup']:.2f}x). Served, int8 / float requests/s: "
              + ", ".join(f"{k.replace('_b', ' b')} {v:.2f}x" for k, v in q["served_gain"].items()) + ".")
    return table


def _plot(result: dict, path: Path) -> None:
    s = result["settings"]
    cells = [(k, b) for b in s["batch_sizes"] for k in KINDS]
    by = {(r["setup"], r["kind"], r["batch"]): r for r in result["runs"]}
    fig, axes = figure((11, 4), ncols=2)
    for ax, key, label in ((axes[0], "requests_per_s", "requests / s"), (axes[1], "p99_ms", "p99 latency (ms)")):
        grouped_bars(ax, len(cells), {SETUP_LABELS[setup]: [by[(setup, k, b)][key] if (setup, k, b) in by else 0.0
                                                            for k, b in cells] for setup in SETUPS},
                     "%.1f" if key == "requests_per_s" else "%.0f")
        ax.set_xticks(range(len(cells)), [f"{'all-task' if k == 'all' else 'single-task'}\nbatch {b}" for k, b in cells])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Serving glue-mini on {s['cluster_cpus']:g} CPUs: merged model and CMOW vs one teacher per task "
                 f"({s['concurrency']} clients)", fontsize=10)
    save_figure(fig, path)
