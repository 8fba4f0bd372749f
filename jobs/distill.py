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
data, augmentation and teachers. The console shows each stage's start and end, labeling progress, one line per
epoch and the results; <storage_root>/<run_name>/run.log holds everything (--verbose: Ray's logs on the console
too). Ctrl-C keeps what is done: rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kdlib import storage
from kdlib.cluster import init_ray
from kdlib.console import on_interrupt, run_log
from kdlib.config import load_run_config
from kdlib.config_loading import config_and_overrides, dump_config
from kdlib.errors import KdlibError
from kdlib.pipeline import (RunContext, distill_students, evaluate, fine_tune, label_tasks, load_data,
                            merge_students, plan_labels, train_teachers, write_results)
from kdlib.resources import check_cluster_gpus, precision_note
from kdlib.trainees import BRANCHED

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STRICT_EXIT = 3  # --strict: the run finished, but a sanity check warned
KEPT = "finished stages stay cached, committed label shards and Ray Train checkpoints are kept"


def parse_args(argv: list[str] | None) -> tuple[str, list[str], bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...]")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with status {STRICT_EXIT} when a sanity check warned (a teacher ensemble within "
                        "2 points of its task's majority-class or mean baseline)")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs on the console too (ray.verbose=true)")
    a = p.parse_intermixed_args(argv)
    config_path, overrides = config_and_overrides(a.args, DEFAULT_CONFIG)
    return config_path, overrides + ["ray.verbose=true"] * a.verbose, a.strict


def main(argv: list[str] | None = None) -> int:
    config_path, overrides, strict = parse_args(argv)
    try:
        cfg = load_run_config(config_path, overrides)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with run_log(storage.child(cfg.storage_root, cfg.run_name), verbose=cfg.ray.verbose) as log, on_interrupt(KEPT):
        return run(cfg, config_path, log, strict)


def run(cfg, config_path: str, log, strict: bool) -> int:
    try:
        started = time.perf_counter()
        ctx = RunContext.create(cfg, log=log)
        dump_config(cfg, storage.child(ctx.run_dir, "config.yaml"))
        log(f"[run] {cfg.run_name}: config {config_path} -> {ctx.run_dir} (full log: run.log)")
        init_ray(cfg.ray.address, cfg.ray.num_cpus, log=log)
        check_cluster_gpus(cfg)  # a GPU setting the cluster cannot give fails here, not as a silent wait
        if note := precision_note(cfg):  # e.g. fp32 on a CPU that multiplies bf16 natively
            log(note)

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
    log(f"\n{ctx.cache.table()}\n\n{results.table()}\n")
    log(f"{'merged model' if branched else cfg.student.kind + ' student'}: {model_dir}")
    log(f"results: {ctx.run_dir}/results.json, results.md ({results.seconds}s)")
    return STRICT_EXIT if strict and results.warnings else 0


if __name__ == "__main__":
    sys.exit(main())
