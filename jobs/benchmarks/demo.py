"""`jobs/benchmark.py demo`: `python jobs/distill.py` on the built-in demo from an empty storage root.

    python jobs/benchmark.py demo

Targets: under 5 minutes on 2 cores; the student within 3 points of its teacher ensemble on every task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import ROOT, distill_job, scratch_dir
from kdlib.scoring import markdown_table

SCALES = ("quick", "full")  # the demo has one size: the scale only names the output files


def demo_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """`python jobs/distill.py` on the demo config from an empty storage root: wall time and score gaps."""
    fresh = str(scratch_dir(storage_root, "kdlib-demo-bench-"))
    job = distill_job()
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
