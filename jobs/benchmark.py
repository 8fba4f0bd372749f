"""Benchmarks: results as JSON, a Markdown table and a PNG plot in --out (default bench-results/).

    python jobs/benchmark.py distill --scale quick [--data-dir ../shared/data/glue-mini]
    ray job submit --working-dir . -- python jobs/benchmark.py distill --scale quick --data-dir /abs/glue-mini

`demo`: `python jobs/distill.py` on the built-in demo from an empty storage root (targets: under
5 minutes on 2 cores; the student within 3 points of its teacher ensemble on every task).

`distill`: the glue-mini pipeline (configs/glue_mini.yaml: MiniLM teachers, merged student) beside a
full fine-tuning baseline per task (all 6 encoder layers and a head trained, one seed), in one run.
Reports each task's primary dev score for the baseline, the teacher ensemble and the merged student,
the student's share of the baseline's average, and the merged model's overhead.
Targets (issue 2): >= 97% of the baseline's average primary score at <= 50% overhead.
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path

import matplotlib

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


BENCHMARKS = {"distill": distill_benchmark, "demo": demo_benchmark}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue-mini"))
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    p.add_argument("--storage-root", default=str(ROOT / "runs"))
    args = p.parse_args()
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
