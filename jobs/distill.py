"""Distil per-task teacher ensembles into one merged multi-task student, end to end on Ray.

Standalone (starts an embedded local Ray; the demo config by default):
    python jobs/distill.py
    python jobs/distill.py configs/glue_mini.yaml data_dir=../shared/data/glue-mini
On a running cluster (`ray start --head`, then):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py storage_root=$PWD/runs

Stages (kdlib/pipeline/), each cached under <storage_root>/cache/<stage>/<fingerprint> so unchanged inputs
are reused:
  data -> teachers (Ray tasks) -> labels (Ray Data actor pool -> soft-target store, resumable shards)
  -> distill (Ray Train; with labeling.stream it consumes the training shards as they are labeled)
  -> fine_tune (optional, MKD sec. 6.2) -> merge (one safetensors artifact) -> evaluate (results in
  <storage_root>/<run_name>/).
The soft-target store (<storage_root>/soft_targets/<task>/<key>/) is shared by every run with the same
data, augmentation and teachers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kdlib import storage
from kdlib.cluster import init_ray
from kdlib.config import load_run_config
from kdlib.config_loading import config_and_overrides, dump_config
from kdlib.errors import KdlibError
from kdlib.pipeline import (RunContext, distill_students, evaluate, fine_tune, label_tasks, load_data,
                            merge_students, plan_labels, train_teachers, write_results)
from kdlib.trainees import BRANCHED

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STRICT_EXIT = 3  # --strict: the run finished, but a sanity check warned


def parse_args(argv: list[str] | None) -> tuple[str, list[str], bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...]")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with status {STRICT_EXIT} when a sanity check warned (a teacher ensemble within "
                        "2 points of its task's majority-class or mean baseline)")
    args = p.parse_intermixed_args(argv)
    return *config_and_overrides(args.args, DEFAULT_CONFIG), args.strict


def main(argv: list[str] | None = None) -> int:
    config_path, overrides, strict = parse_args(argv)
    try:
        cfg = load_run_config(config_path, overrides)
        started = time.perf_counter()
        ctx = RunContext.create(cfg)
        dump_config(cfg, storage.child(ctx.run_dir, "config.yaml"))
        print(f"[run] {cfg.run_name}: config {config_path} -> {ctx.run_dir}")
        init_ray(cfg.ray.address, cfg.ray.num_cpus)

        tasks = load_data(ctx)
        teachers = train_teachers(ctx, tasks)
        labels = plan_labels(ctx, tasks, teachers)
        # Streaming: only dev is labeled up front (it picks each student's initial member); the training
        # shards are labeled while Ray Train consumes them.
        label_tasks(ctx, labels, teachers, splits=("dev",) if cfg.labeling.stream else ("dev", "train"))
        students = distill_students(ctx, tasks, labels, teachers)
        if cfg.labeling.stream:  # what streaming left (nothing, unless the distill stage was cached): label, seal
            label_tasks(ctx, labels, teachers)
        if cfg.distill.fine_tune_epochs:
            students = fine_tune(ctx, tasks, labels, students)
        # The branched students merge onto one trunk; an end-to-end student is one model already.
        branched = cfg.student.kind == BRANCHED
        model_dir = merge_students(ctx, tasks, students) if branched else students.dir
        results = evaluate(ctx, tasks, labels, model_dir)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results.seconds = round(time.perf_counter() - started, 1)
    write_results(ctx, results)
    print(f"\n{ctx.cache.table()}\n\n{results.table()}\n")
    print(f"{'merged model' if branched else cfg.student.kind + ' student'}: {model_dir}")
    print(f"results: {ctx.run_dir}/results.json, results.md ({results.seconds}s)")
    for warning in results.warnings:
        print(f"WARNING {warning}", file=sys.stderr)
    return STRICT_EXIT if strict and results.warnings else 0


if __name__ == "__main__":
    sys.exit(main())
