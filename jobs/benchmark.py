"""Benchmarks: results as JSON, a Markdown table and a PNG plot in --out (default bench-results/).

    python jobs/benchmark.py distill --scale quick [--data-dir ../shared/data/glue-mini]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/benchmark.py distill --scale quick
        --data-dir /abs/glue-mini --out $PWD/bench-results --storage-root $PWD/runs   (one line)
(a submitted job runs in a copy of the working directory: give --out and --storage-root absolutely, or the
results stay in that copy)

`demo`: `python jobs/distill.py` on the built-in demo from an empty storage root (targets: under
5 minutes on 2 cores; the student within 3 points of its teacher ensemble on every task).

`distill`: the glue-mini pipeline (configs/glue_mini.yaml: MiniLM teachers, merged student) beside a
full fine-tuning baseline per task (all 6 encoder layers and a head trained, one seed), in one run.
Reports each task's primary dev score for the baseline, the teacher ensemble and the merged student,
the student's share of the baseline's average, and the merged model's overhead.
Targets (issue 2): >= 97% of the baseline's average primary score at <= 50% overhead.

`labeling`: MiniLM teachers over glue-mini text cut to a fixed sequence length, side by side: the
labeling stage's examples/s against a plain single-process batched loop and a `transformers`
text-classification pipeline (same batch size, same total threads); K = 3 members sharing the bottom
4 of 6 layers against the same members run separately; achieved GFLOP/s against a measured dense
matmul peak; and the demo job's label-then-distill wall time against streamed labeling (full: K = 1
over 24,576 inputs, K = 3 over 6,144; quick: 1,536 each).
Targets (issue 3): >= 0.9x the best baseline; >= 1.6x from the shared trunk; >= 65% of the peak.

`students`: every student (branched, small transformer, BiLSTM, CMOW) distilled from the same glue-mini
teachers: dev scores, parameters, throughput at batch 128 x 128 tokens against a teacher, MKD's
multi-task / single-task / no-KD ablation, Ray Train against a single-process loop
(jobs/benchmarks/students.py says how).

`tune`: jobs/tune_depth.py's depth search on glue-mini from empty storage, with its caches: the merged
model's share of full fine-tuning against its overhead for every threshold c and budget B.
Target (issue 5): >= 99% of full fine-tuning at <= 40% overhead.
`tune_caches`: the same kind of sweep from empty storage with the caches (trunk states, teachers) and
without, back to back: wall times beside the layer passes saved in theory (quick: a smaller sweep, since
the uncached one is several times slower). Target (issue 5): the caches >= 2x faster.

`serve`: the merged model's Ray Serve endpoint against one full-teacher deployment per task, same CPUs,
bounded load tests over loopback (jobs/benchmarks/serve.py). `cluster`: labeling throughput on 1 and 2
simulated worker nodes (ray.cluster_utils.Cluster; jobs/benchmarks/cluster.py).
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdlib.artifact import load_model  # noqa: E402
from kdlib.branched import member_name  # noqa: E402
from kdlib.cluster import init_ray  # noqa: E402
from kdlib.config import load_run_config  # noqa: E402
from kdlib.encoder import encoder_fingerprint, load_encoder, load_tokenizer, resolve_encoder_path  # noqa: E402
from kdlib.evaluate import markdown_table  # noqa: E402
from kdlib.metrics import task_metrics  # noqa: E402
from kdlib.predict import predict  # noqa: E402
from kdlib.stages import StageCache  # noqa: E402

# jobs/benchmarks/ (this script's folder is on sys.path)
from benchmarks.cluster import cluster_benchmark  # noqa: E402
from benchmarks.serve import serve_benchmark  # noqa: E402
from benchmarks.students import SCALES as STUDENT_SCALES  # noqa: E402
from benchmarks.students import students_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCALES = {"quick": 1500, "full": None}  # train rows per task


def distill_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    cap = SCALES[scale]
    overrides = [f"data_dir={data_dir}", f"storage_root={storage_root}", f"run_name=bench_distill_{scale}"]
    overrides += [f"tasks.{t}.max_train_examples={'null' if cap is None else cap}" for t in ("sst2", "mrpc", "stsb")]
    config = str(ROOT / "configs" / "glue_mini.yaml")

    started = time.perf_counter()
    assert job["main"]([config, *overrides]) == 0, "the distillation pipeline failed"
    pipeline_seconds = time.perf_counter() - started
    cfg = load_run_config(config, overrides)
    run = json.loads((Path(storage_root).resolve() / cfg.run_name / "results.json").read_text())

    # Baseline: full fine-tuning (L = N) of one seed per task, through the same teacher stage.
    started = time.perf_counter()
    source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
    n_layers = load_encoder(source).config.num_hidden_layers
    base_cfg = load_run_config(config, overrides + ["teachers.members=1"] +
                               [f"tasks.{t}.fine_tune_layers={n_layers}" for t in cfg.tasks]
                               + [f"tasks.{t}.branch_layers=1" for t in cfg.tasks])
    enc = {"name": cfg.encoder.name, "source": source,
           "fingerprint": encoder_fingerprint(source, False, {}, cfg.seed)}
    tasks = job["load_tasks"](base_cfg)
    base_dirs = job["train_teachers"](base_cfg, tasks, enc, StageCache(Path(storage_root).resolve()))
    encoder, tokenizer = load_encoder(source), load_tokenizer(source)
    baseline = {}
    for name, data in tasks.items():
        model, _ = load_model(base_dirs[name], encoder=encoder)
        pairs = data.dev["text_pair"].tolist()
        outputs = predict(model, tokenizer, data.dev["text"].tolist(), None if pairs[0] is None else pairs,
                          [member_name(name, 0)], max_length=cfg.encoder.max_length)[member_name(name, 0)]
        baseline[name] = task_metrics(data.kind, outputs, data.dev["label"].to_numpy())[data.metric]
    baseline_seconds = time.perf_counter() - started

    rows, per_task = [], {}
    for name, s in run["scores"].items():
        p = s["primary"]
        per_task[name] = {"metric": s["metric"], "baseline_full_ft": baseline[name], "ensemble": p["ensemble"],
                          "members": p["members"], "student": p["student"],
                          "student_vs_baseline_pct": 100 * p["student"] / baseline[name],
                          "branch_layers": run["layers"]["branches"][name]}
        rows.append([name, s["metric"], baseline[name], p["ensemble"], p["student"],
                     per_task[name]["student_vs_baseline_pct"]])
    avg = {k: sum(t[k] for t in per_task.values()) / len(per_task) for k in ("baseline_full_ft", "ensemble", "student")}
    share = 100 * avg["student"] / avg["baseline_full_ft"]
    rows.append(["**average**", "", avg["baseline_full_ft"], avg["ensemble"], avg["student"], share])
    result = {
        "benchmark": "distill", "scale": scale, "train_rows_per_task": cap, "tasks": per_task, "average": avg,
        "student_share_of_baseline_pct": share, "overhead": run["overhead"], "layers": run["layers"],
        "targets": {"share_pct_at_least": 97.0, "overhead_at_most": 0.5,
                    "met": share >= 97.0 and run["overhead"] <= 0.5},
        "seconds": {"pipeline": round(pipeline_seconds, 1), "baseline": round(baseline_seconds, 1)},
        "stages": run["stages"],
    }
    table = markdown_table(["task", "metric", "full fine-tuning", "teacher ensemble", "merged student",
                            "student / full FT %"], rows)
    table += (f"\n\nOverhead of the merged model: {run['overhead']:.1%} (trunk {run['layers']['trunk']} layers + "
              f"branches {run['layers']['branches']} over {run['layers']['encoder']} layers x {len(per_task)} tasks). "
              f"Targets: >= 97% at <= 50% overhead: {'met' if result['targets']['met'] else 'NOT met'}.")
    _plot(per_task, out / f"distill-{scale}.png", run["overhead"])
    return {"result": result, "table": table}


def demo_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """`python jobs/distill.py` on the demo config from an empty storage root: wall time and score gaps."""
    import tempfile

    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    fresh = tempfile.mkdtemp(prefix="kdlib-demo-bench-", dir=storage_root)
    started = time.perf_counter()
    assert job["main"]([str(ROOT / "configs" / "demo.yaml"), f"storage_root={fresh}"]) == 0
    seconds = time.perf_counter() - started
    run = json.loads((Path(fresh) / "demo" / "results.json").read_text())
    rows, gaps = [], {}
    for name, s in run["scores"].items():
        p = s["primary"]
        gaps[name] = p["ensemble"] - p["student"]
        rows.append([name, s["metric"], " / ".join(f"{m:.2f}" for m in p["members"]), p["ensemble"], p["student"],
                     gaps[name]])
    met = seconds < 300 and all(g <= 3.0 for g in gaps.values())
    result = {"benchmark": "demo", "seconds": round(seconds, 1), "gap_points": gaps, "overhead": run["overhead"],
              "scores": run["scores"], "stages": run["stages"],
              "targets": {"seconds_under": 300, "gap_at_most_points": 3.0, "met": met}}
    table = markdown_table(["task", "metric", "teacher members", "teacher ensemble", "student",
                            "ensemble - student (points)"], rows)
    table += (f"\n\nWall time from an empty storage root: {seconds:.0f} s (stages: "
              + ", ".join(f"{r['name']} {r['seconds']:.0f}s" for r in run["stages"])
              + f"); overhead {run['overhead']:.1%}. Targets (< 300 s, student within 3 points on every task): "
              f"{'met' if met else 'NOT met'}.")
    return {"result": result, "table": table}


def _plot(per_task: dict, path: Path, overhead: float) -> None:
    names = list(per_task)
    series = [("full fine-tuning", "baseline_full_ft"), ("teacher ensemble", "ensemble"), ("merged student", "student")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (label, key) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars = ax.bar(xs, [per_task[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), [f"{n}\n({per_task[n]['metric']})" for n in names])
    ax.set_ylabel("dev score (primary metric)")
    ax.set_title(f"glue-mini: merged student at {overhead:.0%} overhead")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def labeling_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """The labeling stage against single-process baselines, shared-trunk ensembles, FLOP/s, streaming."""
    import shutil
    import tempfile

    import torch
    from transformers import BertForSequenceClassification, pipeline

    from kdlib.artifact import save_model
    from kdlib.branched import BranchedModel, BranchSpec
    from kdlib.labeling import run_labeling
    from kdlib.soft_targets import SoftTargetStore, plan_shards
    from kdlib.tokenize import tokenize

    # K = 1 at full scale labels 24,576 inputs (40% of SST-2's training set, a few percent of one x10
    # augmentation pass): a labeling run is long, its ~10 s of actor start-up is paid once. K = 3 uses fewer.
    (n, n_three), seq, bs, threads = {"quick": (1536, 1536), "full": (24576, 6144)}[scale], 64, 64, 2
    job = runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")
    cfg = load_run_config(ROOT / "configs" / "glue_mini.yaml", [f"data_dir={data_dir}"])
    sst2 = job["load_tasks"](cfg)["sst2"].train["text"].tolist()
    # Fixed sequence length: each input joins consecutive SST-2 sentences until it is cut at `seq` tokens,
    # so every method does exactly the same work whatever its padding strategy.
    texts = [" ".join(sst2[(i * 24 + j) % len(sst2)] for j in range(24)) for i in range(n)]
    source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
    encoder, tokenizer = load_encoder(source), load_tokenizer(source)
    assert all(len(x) == seq for x in tokenizer(texts, truncation=True, max_length=seq)["input_ids"])
    n_layers, hidden = encoder.config.num_hidden_layers, encoder.config.hidden_size
    work = Path(tempfile.mkdtemp(prefix="kdlib-label-bench-", dir=storage_root))

    def ensemble(k: int, depth: int) -> BranchedModel:
        specs = [BranchSpec(member_name("t", m), "classification", 2, depth, n_layers - depth) for m in range(k)]
        return BranchedModel.from_encoder(encoder, specs, seed=k).eval()

    one, three = ensemble(1, 4), ensemble(3, 4)
    separate = [ensemble(1, 4) for _ in range(3)]  # three members, each with its own full forward pass

    @torch.inference_mode()
    def loop(models: list[BranchedModel], count: int) -> float:
        """Plain single-process batched loop (tokenize + forward) over the first `count` texts, examples/s."""
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for s in range(0, count, bs):
            enc = {k: torch.from_numpy(v) for k, v in tokenize(tokenizer, texts[s:min(s + bs, count)],
                                                                   max_length=seq).items()}
            for m in models:
                m(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], names=list(m.specs))
        return count / (time.perf_counter() - start)

    def hf_pipeline() -> float:
        torch.set_num_threads(threads)
        model = BertForSequenceClassification.from_pretrained(source, num_labels=2).eval()
        clf = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1, batch_size=bs)
        start = time.perf_counter()
        clf(texts, truncation=True, max_length=seq, function_to_apply="none", top_k=None)
        return n / (time.perf_counter() - start)

    def stage(model: BranchedModel, name: str, count: int) -> dict:
        folder = save_model(model, work / name, include_trunk=False)
        examples = pd.DataFrame({"id": [f"x{i}" for i in range(count)], "task": "t", "split": "train",
                                 "source": "original", "text": texts[:count], "text_pair": None, "label": np.nan})
        store = SoftTargetStore(str(work), "t", name)
        plan = plan_shards("t", examples, 256)
        lab = cfg.labeling
        stats = run_labeling(plan, stores={"t": store}, ensembles={"t": str(folder)}, encoder_source=source,
                             random_init=False, config_overrides={}, seed=0, max_length=seq,
                             num_actors=lab.num_actors, cpus_per_actor=lab.cpus_per_actor,
                             torch_threads=lab.torch_threads, batch_size=bs, progress_seconds=30)
        records = store.commit_records()
        busy = sum(r["seconds"] for r in records) / lab.num_actors  # the actors' labeling time, in parallel
        return {"examples": count, "examples_per_s": count / stats["seconds"], "seconds": stats["seconds"],
                "steady_examples_per_s": count / busy, "startup_seconds": round(stats["seconds"] - busy, 2)}

    def matmul_gflops(size: int = 2048, reps: int = 10, rounds: int = 3) -> float:
        """The machine's dense fp32 matmul GFLOP/s with `threads` threads: the best of `rounds` timings."""
        torch.set_num_threads(threads)
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9)
        return best

    # FLOPs per example of one member's forward: per layer and token 2 x (4 H^2 attention projections +
    # 2 H I feed-forward) plus 2 x 2 T H for attention scores and mixing; embeddings and head are negligible.
    inter = encoder.config.intermediate_size
    layer_flops = seq * (2 * (4 * hidden * hidden + 2 * hidden * inter) + 4 * seq * hidden)
    flops_one = n_layers * layer_flops
    print("[bench] matmul peak ...", flush=True)
    peak = matmul_gflops()
    print("[bench] single-process loop, transformers pipeline, labeling stage (K = 1) ...", flush=True)
    single = loop([one], n)
    hf = hf_pipeline()
    stage_one = stage(one, "k1", n)
    print("[bench] K = 3 shared trunk vs separate members ...", flush=True)
    shared_loop, separate_loop = loop([three], n_three), loop(separate, n_three)
    stage_three = stage(three, "k3", n_three)
    peak_after = matmul_gflops()
    stage_gflops = stage_one["examples_per_s"] * flops_one / 1e9

    print("[bench] label-then-distill vs streamed, demo config ...", flush=True)
    streaming = _streaming_comparison(job, Path(storage_root))
    shutil.rmtree(work, ignore_errors=True)

    best_baseline = max(single, hf)
    # Where the fixed start-up stops mattering: the run length at which end to end reaches 0.9x the best
    # baseline, n / (n / steady + startup) = 0.9 x best (none if the actors' steady rate is below 0.9x).
    steady, startup = stage_one["steady_examples_per_s"], max(0.0, stage_one["startup_seconds"])
    crossover = (startup / (1 / (0.9 * best_baseline) - 1 / steady)) if steady > 0.9 * best_baseline else None
    result = {
        "benchmark": "labeling", "scale": scale, "examples": n, "examples_k3": n_three, "seq_len": seq,
        "batch_size": bs, "threads": threads,
        "labeling_config": cfg.labeling.model_dump(),
        "k1": {"single_process_loop": single, "transformers_pipeline": hf, "labeling_stage": stage_one,
               "stage_vs_best_baseline": stage_one["examples_per_s"] / best_baseline,
               "stage_steady_vs_best_baseline": stage_one["steady_examples_per_s"] / best_baseline,
               "examples_for_0_9x_end_to_end": crossover},
        "k3": {"shared_trunk_loop": shared_loop, "separate_members_loop": separate_loop,
               "shared_gain": shared_loop / separate_loop, "theoretical_gain": 18 / 10,
               "labeling_stage": stage_three},
        "flops": {"per_example_gflop": flops_one / 1e9, "stage_gflops": stage_gflops,
                  "loop_gflops": single * flops_one / 1e9, "matmul_peak_gflops": [peak, peak_after],
                  "stage_share_of_peak": stage_gflops / max(peak, peak_after)},
        "streaming": streaming,
    }
    result["targets"] = {"stage_vs_best_baseline_at_least": 0.9, "shared_gain_at_least": 1.6,
                         "share_of_peak_at_least": 0.65,
                         "met": {"stage_vs_baseline": result["k1"]["stage_vs_best_baseline"] >= 0.9,
                                 "shared_gain": result["k3"]["shared_gain"] >= 1.6,
                                 "share_of_peak": result["flops"]["stage_share_of_peak"] >= 0.65}}
    rows = [["single-process batched loop (K=1)", single, single * flops_one / 1e9, ""],
            ["transformers text-classification pipeline (K=1)", hf, hf * flops_one / 1e9, ""],
            ["kdlib labeling stage (K=1), end to end", stage_one["examples_per_s"], stage_gflops,
             f"{result['k1']['stage_vs_best_baseline']:.2f}x best baseline; {stage_one['startup_seconds']:.0f} s of it "
             f"start-up (actors importing torch, loading MiniLM)"],
            ["kdlib labeling stage (K=1), actors busy", stage_one["steady_examples_per_s"],
             stage_one["steady_examples_per_s"] * flops_one / 1e9,
             f"{stage_one['steady_examples_per_s'] / best_baseline:.2f}x best baseline; end to end reaches 0.9x from "
             + (f"{crossover:,.0f} examples" if crossover else "no run length")],
            ["K=3 members run separately (loop)", separate_loop, "", ""],
            ["K=3 sharing the bottom 4 of 6 layers (loop)", shared_loop, "",
             f"{result['k3']['shared_gain']:.2f}x (theory 1.80x)"],
            ["kdlib labeling stage (K=3 shared)", stage_three["examples_per_s"], "", ""]]
    table = markdown_table(["method", "examples/s", "GFLOP/s", "note"], rows)
    table += (f"\n\nSequence length {seq}, batch {bs}, {threads} threads in total, {n} examples for K=1 and {n_three} "
              f"for K=3. Dense matmul peak "
              f"(2048x2048 fp32, {threads} threads): {peak:.1f} / {peak_after:.1f} GFLOP/s (before / after); the stage "
              f"reaches {100 * result['flops']['stage_share_of_peak']:.0f}% of it.\n\n"
              f"Streaming (demo config, MiniLM, teachers cached): label-then-distill {streaming['label_then_distill_s']:.0f} s, "
              f"streamed {streaming['streamed_s']:.0f} s ({streaming['gain']:.2f}x).\n\n"
              f"Targets: stage >= 0.9x best baseline: {'met' if result['targets']['met']['stage_vs_baseline'] else 'NOT met'}; "
              f"shared trunk >= 1.6x: {'met' if result['targets']['met']['shared_gain'] else 'NOT met'}; "
              f">= 65% of matmul peak: {'met' if result['targets']['met']['share_of_peak'] else 'NOT met'}.")
    _plot_labeling(result, out / f"labeling-{scale}.png")
    return {"result": result, "table": table}


def _streaming_comparison(job: dict, storage_root: Path) -> dict:
    """The demo job with teachers cached: labels then distillation, against labeling streamed into training."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="kdlib-stream-bench-", dir=storage_root))
    base = [str(ROOT / "configs" / "demo.yaml"), f"storage_root={root}", "distill.epochs=3",
            "labeling.num_actors=1", "labeling.cpus_per_actor=0.5", "labeling.torch_threads=2",
            "distill.cpus_per_worker=0.7"]
    assert job["main"](base + ["run_name=warmup"]) == 0  # trains and caches the teachers
    seconds = {}
    for mode in ("label_then_distill", "streamed"):
        for stale in ("soft_targets", "cache/distill", "cache/merge"):
            shutil.rmtree(root / stale, ignore_errors=True)
        start = time.perf_counter()
        assert job["main"](base + [f"run_name={mode}", f"labeling.stream={'true' if mode == 'streamed' else 'false'}"]) == 0
        seconds[mode] = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return {"label_then_distill_s": seconds["label_then_distill"], "streamed_s": seconds["streamed"],
            "gain": seconds["label_then_distill"] / seconds["streamed"],
            "settings": "demo config, distill.epochs=3, 1 labeling actor x 0.5 CPU x 2 threads, 2 workers x 0.7 CPU"}


def _plot_labeling(result: dict, path: Path) -> None:
    k1, k3 = result["k1"], result["k3"]
    labels = ["loop\nK=1", "HF pipeline\nK=1", "stage\nK=1", "separate\nK=3", "shared\nK=3", "stage\nK=3"]
    values = [k1["single_process_loop"], k1["transformers_pipeline"], k1["labeling_stage"]["examples_per_s"],
              k3["separate_members_loop"], k3["shared_trunk_loop"], k3["labeling_stage"]["examples_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#999", "#999", "#1f77b4", "#999", "#ff7f0e", "#1f77b4"])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("examples / s")
    ax.set_title(f"Labeling throughput, MiniLM, seq {result['seq_len']}, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TUNE_SCALES = {  # the sweep trains teachers for every L it tries
    "quick": ["tasks.sst2.max_train_examples=600", "tasks.mrpc.max_train_examples=600",
              "tasks.stsb.max_train_examples=600", "encoder.max_length=96"],
    "full": []}  # configs/tune/glue_mini.yaml as it is: 1,500 rows per task, every (L, l) pair, 128 tokens
# The caches' wall-time gain needs the sweep run twice, the second time without caches (several times slower):
# at quick scale the same sweep (every (L, l) pair once) on less data, at full scale the full one.
TUNE_CACHE_SCALES = {
    "quick": ["tasks.sst2.max_train_examples=200", "tasks.mrpc.max_train_examples=200",
              "tasks.stsb.max_train_examples=200", "encoder.max_length=64",
              "reference.full_fine_tuning=false", "selection.rule=threshold"],  # timing only: any rule that fits
    "full": []}


def tune_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """jobs/tune_depth.py on glue-mini: the merged model's share of full fine-tuning against its overhead, for
    every threshold and budget tried.

    Quality only (the caches' wall time is tune_caches' job), so the sweep keeps one storage root per scale,
    `<storage_root>/bench_tune_<scale>_storage`: a rerun reuses every teacher, trunk state and student whose
    fingerprint (data, encoder, settings, seed) still matches, and computes the rest."""
    import shutil

    tune = runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")
    kept = Path(storage_root) / f"bench_tune_{scale}_storage"
    overrides = [f"data_dir={data_dir}", f"run_name=bench_tune_{scale}", *TUNE_SCALES[scale]]
    c = tune["benchmark"](str(ROOT / "configs" / "tune" / "glue_mini.yaml"), overrides, str(kept), modes=("cached",))["cached"]
    shutil.copy(Path(c["out_dir"]) / "curve.png", out / f"tune-{scale}-curve.png")
    shutil.copy(Path(c["out_dir"]) / "tasks.png", out / f"tune-{scale}.png")
    curve_rows = distinct_curve_rows(c["curve"])
    best_under_40 = max((r for r in curve_rows if r[0] <= 0.40), key=lambda r: r[1], default=None)
    met = {"share_99_at_40pct": bool(best_under_40 and best_under_40[1] >= 99.0)}
    result = {"benchmark": "tune", "scale": scale, "overrides": overrides, "chosen": c["chosen"], "choice": c["choice"],
              "full_fine_tuning": c["full_fine_tuning"], "curve": c["curve"],
              "best_at_most_40pct": None if best_under_40 is None else
              {"overhead": best_under_40[0], "share_of_full_ft": best_under_40[1], "rule": best_under_40[2],
               "setting": best_under_40[3], "choice": best_under_40[4]},
              "sweep_seconds": c["sweep_seconds"], "storage": str(kept), "trials": c["trials"],
              "failed_trials": c["failed_trials"], "targets": {**met, "met": all(met.values())}}
    table = tune_table(result)
    return {"result": result, "table": table}


def distinct_curve_rows(curve: list[dict]) -> list[tuple]:
    """(overhead, share, rule, setting, choice) per distinct selection, by overhead: the thresholds and budgets
    that pick the same branches as an earlier row are left out."""
    rows = sorted(((p["overhead"], p["share_of_full_ft"], p["rule"], p["setting"], p["choice"]) for p in curve),
                  key=lambda r: (r[0], -r[1], r[2], r[3]))
    seen, out = set(), []
    for r in rows:
        key = json.dumps(r[4], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def tune_table(result: dict) -> str:
    """The tune benchmark's Markdown from its result (so a stored JSON renders the same table)."""
    rows = distinct_curve_rows(result["curve"])
    table = markdown_table(["rule", "setting", "overhead", "% of full fine-tuning", "choice (L, l, source) per task"],
                           [[r[2], r[3], f"{r[0]:.1%}", r[1], ", ".join(f"{t} {v[0]}/{v[1]}/{v[2]}" for t, v in r[4].items())]
                            for r in rows])
    ref, chosen, best, scale = result["full_fine_tuning"], result["chosen"], result["best_at_most_40pct"], result["scale"]
    met = result["targets"]["share_99_at_40pct"]
    return table + (
        "\n\n(Each distinct selection once: thresholds and budgets that pick the same branches as a row above are left "
        f"out.) Full fine-tuning (one L = 6 member per task): {', '.join(f'{t} {v:.2f}' for t, v in ref.items())}. "
        f"Chosen ({chosen['rule']} {chosen['setting']:g}): {chosen['share_of_full_ft']:.2f}% of full fine-tuning at "
        f"{chosen['overhead']:.1%} overhead. Sweep: {result['sweep_seconds']:.0f} s in `{result['storage']}`, which "
        f"keeps its caches across runs (wall time from empty storage: tune_caches).\n\nTarget: >= 99% of full "
        f"fine-tuning at <= 40% overhead: {'met' if met else 'NOT met'}"
        + (f" (best within 40%: {best['share_of_full_ft']:.2f}% at {best['overhead']:.1%})" if best else "")
        + f". The caches' wall-time gain: `python jobs/benchmark.py tune_caches --scale {scale}`.")


def tune_caches_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """The same depth sweep from empty storage with the caches and without, back to back in one run: wall time
    of the trials against the layer passes the caches save in theory."""
    import shutil
    import tempfile

    tune = runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")
    fresh = Path(tempfile.mkdtemp(prefix="kdlib-tune-caches-bench-", dir=storage_root))
    overrides = [f"data_dir={data_dir}", f"run_name=bench_tune_caches_{scale}", *TUNE_CACHE_SCALES[scale]]
    both = tune["benchmark"](str(ROOT / "configs" / "tune" / "glue_mini.yaml"), overrides, str(fresh))
    shutil.rmtree(fresh, ignore_errors=True)
    c, u = both["cached"], both["uncached"]
    passes = c["layer_passes"]
    result = {"benchmark": "tune_caches", "scale": scale, "overrides": overrides,
              "sweep_seconds": {"cached": c["sweep_seconds"], "uncached": u["sweep_seconds"]},
              "trials": {"cached": c["trials"], "uncached": u["trials"]},
              "wall_speedup": both["wall_speedup"], "theoretical_speedup": both["theoretical_speedup"],
              "layer_passes": {"cached": passes["cached"], "uncached": passes["uncached"]},
              "targets": {"caches_2x": both["wall_speedup"] >= 2, "met": both["wall_speedup"] >= 2}}
    table = markdown_table(["sweep", "trials", "wall seconds (trials)", "layer passes"],
                           [["with caches", c["trials"], c["sweep_seconds"], passes["cached"]],
                            ["without caches", u["trials"], u["sweep_seconds"], passes["uncached"]]])
    table += (f"\n\nSettings: {' '.join(o for o in overrides if not o.startswith(('data_dir', 'run_name')))}. "
              f"Wall-time gain of the caches: {both['wall_speedup']:.2f}x; layer passes saved: "
              f"{both['theoretical_speedup']:.2f}x in theory.\n\nTarget: caches >= 2x faster: "
              f"{'met' if result['targets']['met'] else 'NOT met'}.")
    _plot_tune_caches(result, out / f"tune_caches-{scale}.png")
    return {"result": result, "table": table}


def _plot_tune_caches(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    secs = result["sweep_seconds"]
    bars = ax.bar(["with caches", "without caches"], [secs["cached"], secs["uncached"]], color=["#1f77b4", "#999"])
    ax.bar_label(bars, fmt="%.0f s", fontsize=8)
    ax.set_ylabel("sweep wall time (s)")
    ax.set_title(f"Depth sweep: {result['wall_speedup']:.2f}x with caches (theory {result['theoretical_speedup']:.2f}x)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BENCHMARKS = {"distill": distill_benchmark, "demo": demo_benchmark, "labeling": labeling_benchmark,
              "students": students_benchmark, "tune": tune_benchmark, "tune_caches": tune_caches_benchmark,
              "serve": serve_benchmark,
              "cluster": cluster_benchmark}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--scale", choices=sorted({*SCALES, *STUDENT_SCALES}), default="quick",
                   help="quick or full; the students benchmark also has transfer")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue-mini"))
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    p.add_argument("--storage-root", default=str(ROOT / "runs"))
    args = p.parse_args()
    if args.scale not in (STUDENT_SCALES if args.name == "students" else SCALES):
        p.error(f"--scale {args.scale} is for the students benchmark only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(None, None)
    report = BENCHMARKS[args.name](args.scale, str(Path(args.data_dir).resolve()), out, args.storage_root)
    stem = out / f"{args.name}-{args.scale}"
    stem.with_suffix(".json").write_text(json.dumps(report["result"], indent=2))
    command = f"python jobs/benchmark.py {args.name} --scale {args.scale}"
    stem.with_suffix(".md").write_text(f"# {args.name} ({args.scale})\n\n`{command}`\n\n{report['table']}\n")
    print(f"\n{report['table']}\n\nwrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
