"""Benchmarks: results as JSON, a Markdown table and a PNG plot in --out (default bench-results/), then
README's results table rebuilt from all of them.

    python jobs/benchmark.py distill --scale quick [--data-dir ../shared/data/glue-mini]
    python jobs/benchmark.py readme      # only README's results table, from what --out holds
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/benchmark.py distill --scale quick
        --data-dir /abs/glue-mini --out $PWD/bench-results --storage-root $PWD/runs   (one line)
(a submitted job runs in a copy of the working directory: give --out and --storage-root absolutely, or the
results stay in that copy; then `python jobs/benchmark.py readme` here updates README)

Each benchmark is jobs/benchmarks/<name>.py; its docstring says what it measures and its targets:

    demo         `python jobs/distill.py` on the built-in demo from an empty storage root, timed
    distill      the glue-mini pipeline beside full fine-tuning per task
    labeling     the labeling stage against single-process baselines; shared trunk, FLOP/s, streaming
    students     every student distilled from the same glue-mini teachers: scores, size, speed, MKD ablation
    own_teachers SST-2 teachers fine-tuned with plain transformers, distilled into CMOW and branched students
    tune         jobs/tune_depth.py's depth search: quality against overhead
    tune_caches  the same kind of sweep with its caches and without: wall time
    serve        the merged model on Ray Serve against one teacher deployment per task
    cluster      labeling on 1 and 2 simulated worker nodes; Ray's job overhead
    gpu          every stage on one GPU against plain PyTorch (needs CUDA; --scale quick runs anywhere)
    precision    bf16 against fp32 on this machine's CPU: matmul, labeling, the demo pipeline, serving

A module's `<name>_benchmark(scale, data_dir, out, storage_root)` returns {"result", "table"} and draws the
PNG; its SCALES are the scales it has. jobs/benchmarks/common.py holds what they share.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

# jobs/benchmarks/: this script's folder is on sys.path when it runs as a script
from benchmarks.common import ROOT, write_report
from benchmarks.readme import NAMES, MarkersMissing, update_readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted([*NAMES, "readme"]))
    p.add_argument("--scale", choices=["full", "quick", "transfer"], default=None,
                   help="quick or full (default: quick; gpu: full); the students benchmark also has transfer")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue-mini"))
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    p.add_argument("--storage-root", default=str(ROOT / "runs"))
    p.add_argument("--config", default=None,
                   help="distill and tune: the pipeline config they run (default configs/glue_mini.yaml, "
                        "configs/tune/glue_mini.yaml), e.g. configs/glue_mini_gpu.yaml on a GPU machine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="distill and tune: a config override after the benchmark's own (repeatable), e.g. "
                        "--set encoder.path=/models/minilm --set tasks.sst2.max_train_examples=null")
    args = p.parse_args(argv)
    out, readme = Path(args.out), ROOT / "README.md"
    if args.name == "readme":
        try:
            print(f"{readme}: results table {'rebuilt' if update_readme(readme, out) else 'already current'} "
                  f"from {out}")
        except MarkersMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    bench = importlib.import_module(f"benchmarks.{args.name}")
    args.scale = args.scale or getattr(bench, "DEFAULT_SCALE", "quick")
    if args.scale not in bench.SCALES:
        p.error(f"--scale {args.scale}: the {args.name} benchmark has {', '.join(bench.SCALES)}")
    run_benchmark = getattr(bench, f"{args.name}_benchmark")
    pipeline = {}
    if args.config or args.overrides:
        if "overrides" not in inspect.signature(run_benchmark).parameters:
            p.error(f"--config and --set: the {args.name} benchmark takes no pipeline config (distill and tune do)")
        if args.config and not Path(args.config).is_file():
            p.error(f"--config {args.config}: no such file")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            p.error(f"--set {bad[0]}: expected KEY=VALUE")
        pipeline = {"config": args.config, "overrides": args.overrides}
    reason = getattr(bench, "unavailable", lambda scale: None)(args.scale)  # e.g. gpu without CUDA
    if reason:
        print(f"{args.name}: {reason}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    Path(args.storage_root).mkdir(parents=True, exist_ok=True)
    from kdlib.cluster import init_ray  # here: --help and readme start no Ray
    from kdlib.console import on_interrupt

    with on_interrupt(f"the results in {out} and the cached stages under {args.storage_root} are kept",
                      then="run the same command again (timed runs start from empty storage again)"):
        init_ray(None, None)
        report = run_benchmark(args.scale, str(Path(args.data_dir).resolve()), out, args.storage_root, **pipeline)
    flags = ([f"--config {args.config}"] if args.config else []) + [f"--set {o}" for o in args.overrides]
    stem = write_report(args.name, args.scale, report, out, flags)
    print(f"\n{report['table']}\n\nwrote {stem}.json, .md, .png")
    if out.resolve() != (ROOT / "bench-results").resolve():  # README summarises the committed results only
        return 0
    try:
        update_readme(readme, out)
    except MarkersMissing as e:  # the results are written; only README's summary is not
        print(f"README.md not updated: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
