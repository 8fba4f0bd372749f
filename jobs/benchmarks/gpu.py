"""`jobs/benchmark.py gpu`: kdlib's stages on one GPU against plain single-process PyTorch on the same model.

    python jobs/benchmark.py gpu                  # full: needs CUDA; elsewhere it says so and exits 0
    python jobs/benchmark.py gpu --scale quick    # the same code paths at toy sizes on any device (tests)
    bash jobs/benchmarks/gpu_machine.sh           # on the GPU benchmark machine (see that script)

KDLIB_ENCODER_PATH names a folder with MiniLM's config.json and tokenizer where the offline package is not
installed (the GPU machine: ../shared/gpu/pack-minilm-bf16.sh carries one).

Random-init teachers (throughput does not depend on weight values; quality numbers come from the CPU runs),
K = 3 members sharing a frozen trunk (the bottom N - 2 layers), bf16, GPU utilisation sampled throughout
(nvidia-smi every 200 ms; mean and median per section).

- labeling, GPU-bound (MiniLM 6 x 384 and BERT-base 12 x 768, inputs of exactly 128 tokens): the labeling
  stage (4 actors x 0.25 GPU) while busy and end to end, against a plain bf16 forward loop over
  pre-tokenized tensors already on the GPU. Target: >= 0.8x while busy.
- labeling, real text (SST-2 sentences repeated to 1M inputs, MiniLM shape, tokenization included): the stage
  (token-budget batches) against a plain loop that tokenizes (fast tokenizer, padding to the longest) and
  runs the model in bf16, batch 1024. The plain loop's rate is measured on its first 131,072 inputs (its
  steady rate; the whole million would cost two minutes of the budget). Targets: >= 3x while busy, >= 2x
  end to end.
- the demo pipeline on the GPU (configs/demo.yaml with GPU settings, bf16) against the same on the CPU,
  per stage: teachers, labels, distill (Ray Train, one GPU worker), merge, evaluate.
- distillation: the GPU demo run's Ray Train epoch (one GPU worker) against one epoch of the same loop
  (kdlib.train_loop.run_epochs) in this process on the GPU, rows/s. Target: >= 0.9x.
- Serve: the GPU demo run's merged model against one teacher deployment per task (each task's best member
  as a full model), every replica on the one GPU (3 replicas per setup, 1/6 of the GPU each, bf16, dynamic
  batches of up to 256 inputs), through the same server code and load test as `jobs/benchmark.py serve`:
  single-task and all-task requests of 1 and 32 inputs, requests/s, inputs/s, p50, p99, errors. Target:
  all-task >= 2x the per-task deployments at both sizes, with 0 errors.
The plain baselines run 3 times (median and spread); the stage runs once per shape.

Budget on the H200 (8 minutes in all, Ray start-up included): GPU-bound labeling ~2 min (2 shapes),
real text ~2.5 min, demo pipeline ~2 min, Serve ~1 min. After each section the results so far are written
to gpu-<scale>.partial.json in --out, so a run cut short by the machine's time limit still brings back
what it measured; a finished run removes it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import GLUE_MINI, ROOT, bar_chart, distill_job, fixed_length_texts, scratch_dir
from benchmarks.students import ray_train_vs_single_process
from kdlib.scoring import markdown_table

SCALES = ("full", "quick")
DEFAULT_SCALE = "full"  # `python jobs/benchmark.py gpu` measures the GPU; quick is the toy run of its code paths
MINILM = {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}
BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
TOY = {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# scale: shapes, GPU-bound inputs per shape, real-text inputs, plain-loop inputs, plain batch, repeats
SIZES = {"full": {"shapes": {"minilm": MINILM, "bert_base": BERT_BASE}, "bound": {"minilm": 524288,
                                                                                "bert_base": 131072},
                  "text": 1_048_576, "text_plain": 131072, "batch": {"minilm": 1024, "bert_base": 256},
                  "repeats": 3, "shard": 16384},
         "quick": {"shapes": {"toy": TOY}, "bound": {"toy": 512}, "text": 1024, "text_plain": 512,
                   "batch": {"toy": 64}, "repeats": 3, "shard": 256}}
K, SEQ = 3, 128
# Serve: requests per setup and batch size, warm-up requests, rounds; the batch sizes the issue names
SERVE = {"full": {"requests": {1: 1200, 32: 480}, "warmup": 32, "rounds": 3},
         "quick": {"requests": {1: 24, 32: 12}, "warmup": 4, "rounds": 2}}
SERVE_BATCHES = (1, 32)


def unavailable(scale: str) -> str | None:
    """Why this benchmark cannot run here (checked before Ray starts), or None."""
    import torch

    if scale == "full" and not torch.cuda.is_available():
        return ("the gpu benchmark measures a CUDA GPU and this machine has none: nothing measured, nothing "
                "written. Run it where there is one (bash jobs/benchmarks/gpu_machine.sh on the GPU benchmark "
                "machine), or `--scale quick` for its code paths at toy sizes on this device.")
    return None


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms in a background thread (nothing without a GPU)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                     "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        for line in proc.stdout:
            if self._stop.is_set():
                break
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass
        proc.terminate()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict:
        s = self.samples
        return {"gpu_util_mean": round(float(np.mean(s)), 1) if s else None,
                "gpu_util_median": float(np.median(s)) if s else None, "gpu_util_samples": len(s)}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def gpu_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    import torch

    from kdlib.config import load_run_config
    from kdlib.device import device
    from kdlib.encoder import load_tokenizer, resolve_encoder_path
    from kdlib.pipeline.data import load_tasks

    sizes = SIZES[scale]
    dev = device()
    # MiniLM's config and tokenizer: the offline package here, a carried folder on the GPU machine
    encoder_path = os.environ.get("KDLIB_ENCODER_PATH")
    source = resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2", encoder_path)
    tokenizer = load_tokenizer(source)
    cfg = load_run_config(GLUE_MINI, [f"data_dir={data_dir}", "tasks.sst2.max_train_examples=null"])
    sentences = load_tasks(cfg)["sst2"].train["text"].tolist()
    work = scratch_dir(storage_root, "kdlib-gpu-bench-")
    result = {"benchmark": "gpu", "scale": scale, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    rows = []

    for shape, overrides in sizes["shapes"].items():
        n, bs = sizes["bound"][shape], sizes["batch"][shape]
        texts = fixed_length_texts(sentences, tokenizer, min(n, 4096), SEQ)
        texts = (texts * (n // len(texts) + 1))[:n]
        model, folder = _ensemble(source, overrides, work / f"ens-{shape}")
        enc = tokenizer(texts[: bs * 8], truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items()}
        with GpuSampler() as util_plain:
            plain = spread([_plain_forward(model.to(dev), enc, n, bs) for _ in range(sizes["repeats"])])
        with GpuSampler() as util_stage:
            stage = _stage(texts, folder, source, overrides, work, f"bound-{shape}", bs, None, sizes["shard"], dev)
        result[f"bound_{shape}"] = {"inputs": n, "plain_seq_per_s": plain, **stage,
                                    "busy_vs_plain": stage["busy_seq_per_s"] / plain["median"],
                                    "plain_util": util_plain.summary(), "stage_util": util_stage.summary()}
        rows.append([f"GPU-bound, {shape}, {n:,} x {SEQ} tokens", plain["median"], stage["busy_seq_per_s"],
                     stage["end_to_end_seq_per_s"], result[f"bound_{shape}"]["busy_vs_plain"]])
        _write_partial(out, scale, result)

    shape = next(iter(sizes["shapes"]))
    model, folder = _ensemble(source, sizes["shapes"][shape], work / "ens-text")
    texts = (sentences * (sizes["text"] // len(sentences) + 1))[: sizes["text"]]
    with GpuSampler() as util_plain:
        plain = spread([_plain_text(model.to(dev), tokenizer, texts[: sizes["text_plain"]], 1024, dev)
                        for _ in range(sizes["repeats"])])
    with GpuSampler() as util_stage:
        stage = _stage(texts, folder, source, sizes["shapes"][shape], work, "text", 1024, 131072, sizes["shard"], dev)
    result["text"] = {"inputs": len(texts), "plain_inputs": sizes["text_plain"], "plain_seq_per_s": plain, **stage,
                      "busy_vs_plain": stage["busy_seq_per_s"] / plain["median"],
                      "end_to_end_vs_plain": stage["end_to_end_seq_per_s"] / plain["median"],
                      "plain_util": util_plain.summary(), "stage_util": util_stage.summary()}
    rows.append([f"SST-2 text, {shape}, {len(texts):,} inputs", plain["median"], stage["busy_seq_per_s"],
                 stage["end_to_end_seq_per_s"], result["text"]["busy_vs_plain"]])

    _write_partial(out, scale, result)
    with GpuSampler() as util_demo:
        result["demo"], runs, demo_args = _demo_per_stage(work, gpu=dev.type == "cuda", toy=scale == "quick",
                                                          encoder_path=encoder_path)
    result["demo"]["util"] = util_demo.summary()
    _write_partial(out, scale, result)
    # The GPU run's distillation (Ray Train, one worker) against one epoch of the same loop in this process
    train = ray_train_vs_single_process(runs["gpu"], str(work / "demo-gpu"), threads=4,
                                        ray_train="1 Ray Train worker" + (", 1 GPU" if dev.type == "cuda" else ""))
    result["distill"] = train
    rows.append([f"distillation ({train['student']} student, demo data), rows/s", train["single_process_rows_per_s"],
                 train["ray_train_rows_per_s"], "", train["ray_train_share"]])
    _write_partial(out, scale, result)

    with GpuSampler() as util_serve:
        result["serve"] = _serve(runs["gpu"], demo_args["gpu"], dev, SERVE[scale], work / "serve-teachers")
    result["serve"]["util"] = util_serve.summary()

    bound = [result[k]["busy_vs_plain"] for k in result if k.startswith("bound_")]
    checks = {"bound_busy_0.8x": min(bound) >= 0.8, "text_busy_3x": result["text"]["busy_vs_plain"] >= 3,
              "text_end_to_end_2x": result["text"]["end_to_end_vs_plain"] >= 2,
              "distill_0.9x": result["distill"]["ray_train_share"] >= 0.9,
              "serve_all_task_2x": result["serve"]["all_task_2x_zero_errors"]}
    result["targets"] = {**checks, "met": all(checks.values()) and scale == "full"}
    table = markdown_table(["workload", "plain loop seq/s (median of 3; distillation: 1 run)",
                            "stage seq/s while busy (distillation: Ray Train's last epoch)", "stage seq/s end to end",
                            "busy / plain"], rows)
    demo = result["demo"]
    table += ("\n\nDemo pipeline per stage, seconds (GPU vs CPU): " + ", ".join(
        f"{s} {demo['gpu'].get(s, float('nan')):.1f} vs {demo['cpu'].get(s, float('nan')):.1f}" for s in demo["cpu"])
        + ".\n\n" + result["serve"].pop("table")
        + f"\n\nDevice: {result['device_name']}. Targets: {checks}.")
    bar_chart(out / f"gpu-{scale}.png", [r[0].split(",")[0] + "," + r[0].split(",")[1] for r in rows],
              [r[4] for r in rows], ylabel="stage while busy / plain loop", title=f"kdlib on {result['device_name']}",
              fmt="%.2fx")
    (out / f"gpu-{scale}.partial.json").unlink(missing_ok=True)
    return {"result": result, "table": table}


def _write_partial(out: Path, scale: str, result: dict) -> None:
    """The results so far, in case the machine's time runs out before the last section."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{scale}.partial.json").write_text(json.dumps(result, indent=1, default=str))


def _ensemble(source: str, overrides: dict, folder: Path):
    """K members sharing the bottom N - 2 layers of a random-init encoder of the given shape, saved trunk-less."""
    from kdlib.artifact import save_model
    from kdlib.branched import BranchedModel, BranchSpec, member_name
    from kdlib.encoder import load_encoder

    encoder = load_encoder(source, True, overrides, seed=0)
    n = encoder.config.num_hidden_layers
    model = BranchedModel.from_encoder(encoder, [BranchSpec(member_name("t", k), "classification", 2, n - 2, 2)
                                                 for k in range(K)]).eval()
    save_model(model, folder, include_trunk=False)
    return model, str(folder)


def _plain_forward(model, enc: dict, n: int, bs: int) -> float:
    """Seq/s of a plain bf16 loop over pre-tokenized inputs already on the device (batches reused)."""
    import torch

    from kdlib.device import autocast, model_device

    dev = model_device(model)
    batches = [{k: v[s:s + bs] for k, v in enc.items()} for s in range(0, len(enc["input_ids"]), bs)]
    names = list(model.specs)
    with torch.inference_mode(), autocast(dev, "bf16"):
        model(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["token_type_ids"], names=names)
        _sync(dev)
        start, done = time.perf_counter(), 0
        while done < n:
            b = batches[(done // bs) % len(batches)]
            model(b["input_ids"], b["attention_mask"], b["token_type_ids"], names=names)
            done += len(b["input_ids"])
        _sync(dev)
    return done / (time.perf_counter() - start)


def _plain_text(model, tokenizer, texts: list[str], bs: int, dev) -> float:
    """Seq/s of a plain loop that tokenizes (padding to the longest) and runs the model in bf16."""
    import torch

    from kdlib.device import autocast

    names = list(model.specs)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(dev, "bf16"):
        for s in range(0, len(texts), bs):
            enc = tokenizer(texts[s:s + bs], truncation=True, max_length=SEQ, padding="longest", return_tensors="pt")
            enc = {k: v.to(dev, non_blocking=True) for k, v in enc.items()}
            model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], names=names)
        _sync(dev)
    return len(texts) / (time.perf_counter() - start)


def _stage(texts, folder, source, overrides, work: Path, name: str, bs: int, batch_tokens, shard: int, dev) -> dict:
    """The labeling stage over `texts`: 4 actors sharing the GPU (CPU actors without one), bf16."""
    from kdlib.labeling import run_labeling
    from kdlib.soft_targets import SoftTargetStore, plan_shards

    examples = pd.DataFrame({"id": [f"x{i}" for i in range(len(texts))], "task": "t", "split": "train",
                             "source": "original", "text": texts, "text_pair": None, "label": np.nan})
    store = SoftTargetStore(str(work), "t", name)
    gpu = dev.type == "cuda"
    actors = 4 if gpu else 2
    stats = run_labeling(plan_shards("t", examples, shard), stores={"t": store}, ensembles={"t": folder},
                         encoder_source=source, random_init=True, config_overrides=overrides, seed=0, max_length=SEQ,
                         num_actors=actors, cpus_per_actor=3 if gpu else 0.5, gpus_per_actor=0.25 if gpu else 0.0,
                         torch_threads=2 if gpu else 1, batch_size=bs, batch_tokens=batch_tokens, precision="bf16",
                         progress_seconds=30)
    busy = sum(r["seconds"] for r in store.commit_records()) / actors
    return {"busy_seq_per_s": len(texts) / busy, "end_to_end_seq_per_s": len(texts) / stats["seconds"],
            "stage_seconds": stats["seconds"], "startup_seconds": round(stats["seconds"] - busy, 2)}


def _demo_per_stage(work: Path, gpu: bool, toy: bool, encoder_path: str | None) -> dict:
    """configs/demo.yaml on a random-init MiniLM shape (toy: a tiny encoder and 60 rows per task), with GPU
    settings (bf16) and on CPUs: seconds per stage (a stage of several tasks: their sum)."""
    job = distill_job()
    base = ["encoder.random_init=true", "teachers.epochs=2", "distill.epochs=3", "distill.num_workers=1"]
    if encoder_path:
        base.append(f"encoder.path={encoder_path}")
    if toy:
        base += ["encoder.config_overrides={hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, "
                 "intermediate_size: 64}", "distill.epochs=1", "teachers.epochs=1", "labeling.cpus_per_actor=0.5",
                 "distill.cpus_per_worker=0.5", "tasks.paraphrase.fine_tune_layers=3",
                 "tasks.paraphrase.branch_layers=2"] + [f"tasks.{t}.max_train_examples=60"
                                                         for t in ("sentiment", "paraphrase", "similarity")]
    gpu_settings = ["precision=bf16", "teachers.gpus_per_task=0.33", "labeling.gpus_per_actor=0.25",
                    "labeling.num_actors=4", "distill.gpus_per_worker=1"] if gpu else ["precision=bf16"]
    out, runs, args = {}, {}, {}
    for name, extra in (("cpu", []), ("gpu", gpu_settings)):
        root = work / f"demo-{name}"
        args[name] = [f"storage_root={root}", *base, *extra]
        assert job["main"]([str(ROOT / "configs" / "demo.yaml"), *args[name]]) == 0
        run = runs[name] = json.loads((root / "demo" / "results.json").read_text())
        per = {}
        for r in run["stages"]:
            stage = r["name"].split(":")[0]
            per[stage] = per.get(stage, 0.0) + r["seconds"]
        out[name] = per
    return out, runs, args


def _serve(run: dict, overrides: list[str], dev, settings: dict, teachers_root: Path) -> dict:
    """The demo run's merged model against one teacher deployment per task, all replicas on `dev`'s GPU (on a
    CPU: the same code paths with CPU replicas), measured as `jobs/benchmark.py serve` measures."""
    import ray

    from benchmarks.serve import (compare_setups, deploy_apps, measure_setups, serve_url, teacher_artifacts,
                                  teardown_apps)
    from kdlib.config import load_run_config
    from kdlib.pipeline.data import load_tasks

    cfg = load_run_config(str(ROOT / "configs" / "demo.yaml"), overrides)
    tasks = load_tasks(cfg)
    teachers = teacher_artifacts(cfg, run, tasks, teachers_root)
    gpu = dev.type == "cuda"
    replicas = len(tasks)  # per setup: one replica per task, or as many replicas of the merged model
    share = round(1 / (2 * replicas) - 0.005, 2) if gpu else 0.0  # both setups together: just under one GPU
    cpus = 1.0 if gpu else round(min(0.3, 0.9 * ray.cluster_resources().get("CPU", 1) / (2 * replicas)), 2)
    base = {"num_replicas": 1, "num_cpus": cpus, "num_gpus": share, "precision": "bf16",
            "torch_threads": 2 if gpu else 1, "max_batch_size": 256 if gpu else 64,
            "max_inputs_per_request": max(SERVE_BATCHES), "batch_wait_timeout_s": 0.005,
            "token_env": "KDLIB_SERVE_BENCH_TOKEN"}  # an unset variable: no token
    apps = {"gpu-bench-merged": ("/merged", {**base, "num_replicas": replicas, "model_dir": run["model_dir"]})}
    task_prefixes = {t: f"/teacher/{t}" for t in tasks}
    for t, info in teachers.items():
        apps[f"gpu-bench-teacher-{t}"] = (task_prefixes[t], {**base, "model_dir": info["dir"]})
    inputs_by_task = {t: [{"text": x, **({"text_pair": p} if isinstance(p, str) else {})}
                          for x, p in zip(d.dev["text"].tolist(), d.dev["text_pair"].tolist())]
                      for t, d in tasks.items()}
    url, started_serve = serve_url()
    try:
        print(f"[gpu-bench] serve: deploying {len(apps)} applications ({share:g} GPU, {cpus:g} CPU per replica, "
              f"bf16) ...", flush=True)
        t0 = time.perf_counter()
        deploy_apps(apps)
        deploy_s = time.perf_counter() - t0
        runs = measure_setups(url, {"merged": {"merged_prefix": "/merged"},
                                    "per_task": {"task_prefixes": task_prefixes}},
                              inputs_by_task, settings, SERVE_BATCHES, log="gpu-bench")
    finally:
        teardown_apps(list(apps), started_serve)
    comparison = compare_setups(runs, SERVE_BATCHES)
    gains = {k: v["merged_vs_per_task"] for k, v in comparison["gains"].items()}
    ok = comparison["targets"]["met"]["all_task_gain"] and comparison["targets"]["met"]["zero_errors"]
    labels = {"merged": "merged model", "per_task": "one teacher deployment per task"}
    rows = [[labels[r["setup"]], "all-task" if r["kind"] == "all" else "single-task", r["batch"], r["requests_per_s"],
             r["inputs_per_s"], r["p50_ms"], r["p99_ms"], f"{r['errors']} / {r['requests']}"] for r in runs]
    from kdlib.scoring import markdown_table

    table = ("Serve (demo tasks, " + f"{replicas} replicas per setup, {share:g} GPU each, bf16):\n\n"
             + markdown_table(["setup", "request", "inputs / request", "requests/s", "inputs/s", "p50 ms", "p99 ms",
                               "errors / requests"], rows)
             + "\n\nAll-task, merged / per-task: " + ", ".join(
                 f"{gains[f'all_b{b}']:.2f}x (batch {b})" for b in SERVE_BATCHES)
             + "; the median round " + ", ".join(
                 f"{g['median']:.2f}x ({g['min']:.2f}-{g['max']:.2f}x, {k.replace('_b', ' batch ')})"
                 for k, g in comparison["round_gains"].items() if k.startswith("all_"))
             + f"; errors {comparison['errors']}.")
    return {"replicas_per_setup": replicas, "gpus_per_replica": share, "cpus_per_replica": cpus,
            "deploy_seconds": round(deploy_s, 1), "runs": runs, "merged_vs_per_task": gains,
            "round_gains": comparison["round_gains"],
            "errors": comparison["errors"], "incomplete": comparison["incomplete"],
            "all_task_2x_zero_errors": bool(ok), "teachers": {t: v["dir"] for t, v in teachers.items()},
            "table": table}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
