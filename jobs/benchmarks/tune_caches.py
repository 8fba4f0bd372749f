"""`jobs/benchmark.py tune_caches`: the depth sweep's caches, timed.

    python jobs/benchmark.py tune_caches --scale quick

The same kind of sweep as `tune` from empty storage with the caches (trunk states, teachers) and without,
back to back: wall times beside the layer passes saved in theory (quick: a smaller sweep, since the
uncached one is several times slower). Target (issue 5): the caches >= 2x faster.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.common import ROOT, bar_chart, scratch_dir, tune_depth_job
from kdlib.scoring import markdown_table

# The caches' wall-time gain needs the sweep run twice, the second time without caches (several times slower):
# at quick scale the same sweep (every (L, l) pair once) on less data, at full scale the full one.
SCALES = {
    "quick": ["tasks.sst2.max_train_examples=200", "tasks.mrpc.max_train_examples=200",
              "tasks.stsb.max_train_examples=200", "encoder.max_length=64",
              "reference.full_fine_tuning=false", "selection.rule=threshold"],  # timing only: any rule that fits
    "full": []}


def tune_caches_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """The same depth sweep from empty storage with the caches and without, back to back in one run: wall time
    of the trials against the layer passes the caches save in theory."""
    fresh = scratch_dir(storage_root, "kdlib-tune-caches-bench-")
    overrides = [f"data_dir={data_dir}", f"run_name=bench_tune_caches_{scale}", *SCALES[scale]]
    both = tune_depth_job()["benchmark"](str(ROOT / "configs" / "tune" / "glue_mini.yaml"), overrides, str(fresh))
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
    _plot(result, out / f"tune_caches-{scale}.png")
    return {"result": result, "table": table}


def _plot(result: dict, path: Path) -> None:
    secs = result["sweep_seconds"]
    bar_chart(path, ["with caches", "without caches"], [secs["cached"], secs["uncached"]], colors=["#1f77b4", "#999"],
              fmt="%.0f s", ylabel="sweep wall time (s)", figsize=(5, 3.5), title_size=9,
              title=f"Depth sweep: {result['wall_speedup']:.2f}x with caches (theory {result['theoretical_speedup']:.2f}x)")
