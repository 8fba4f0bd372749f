"""`jobs/benchmark.py distill`: the glue-mini pipeline beside full fine-tuning.

    python jobs/benchmark.py distill --scale quick [--data-dir ../shared/data/glue-mini]

The glue-mini pipeline (configs/glue_mini.yaml: MiniLM teachers, merged student) beside a full fine-tuning
baseline per task (all 6 encoder layers and a head trained, one seed), in one run. Reports each task's
primary dev score for the baseline, the teacher ensemble and the merged student, the student's share of
the baseline's average, and the merged model's overhead.
Targets (issue 2): >= 97% of the baseline's average primary score at <= 50% overhead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import GLUE_MINI, distill_job, figure, grouped_bars, row_caps, save_figure
from kdlib.artifact import load_model
from kdlib.branched import member_name
from kdlib.config import load_run_config
from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.scoring import markdown_table
from kdlib.metrics import task_metrics
from kdlib.predict import predict
from kdlib.pipeline.data import load_tasks

SCALES = {"quick": 1500, "full": None}  # train rows per task


def distill_benchmark(scale: str, data_dir: str, out: Path, storage_root: str, config: str | None = None,
                      overrides: list[str] = ()) -> dict:
    """`config` (default configs/glue_mini.yaml) and `overrides` (after the scale's): jobs/benchmark.py's
    --config and --set, e.g. configs/glue_mini_gpu.yaml and the real weights' folder on the GPU machine."""
    from kdlib.pipeline.context import RunContext
    from kdlib.pipeline.teachers import train_teachers

    cap = SCALES[scale]
    extra = list(overrides)
    overrides = [f"data_dir={data_dir}", f"storage_root={storage_root}", f"run_name=bench_distill_{scale}",
                 *row_caps(("sst2", "mrpc", "stsb"), cap), *extra]
    config = str(config or GLUE_MINI)

    started = time.perf_counter()
    assert distill_job()["main"]([config, *overrides]) == 0, "the distillation pipeline failed"
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
    tasks = load_tasks(base_cfg)
    base_dirs = train_teachers(RunContext.create(base_cfg), tasks).dirs
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
        "benchmark": "distill", "scale": scale, "config": config, "overrides": extra, "precision": cfg.precision,
        "train_rows_per_task": cap, "tasks": per_task, "average": avg,
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


def _plot(per_task: dict, path: Path, overhead: float) -> None:
    names = list(per_task)
    series = {"full fine-tuning": "baseline_full_ft", "teacher ensemble": "ensemble", "merged student": "student"}
    fig, ax = figure((7, 4))
    grouped_bars(ax, len(names), {label: [per_task[n][key] for n in names] for label, key in series.items()}, "%.1f")
    ax.set_xticks(range(len(names)), [f"{n}\n({per_task[n]['metric']})" for n in names])
    ax.set_ylabel("dev score (primary metric)")
    ax.set_title(f"glue-mini: merged student at {overhead:.0%} overhead")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)
