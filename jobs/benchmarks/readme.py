"""README.md's results table, rebuilt from the benchmarks' JSON results (bench-results/<name>-<scale>.json).

    python jobs/benchmark.py readme      (every benchmark also runs it once its results are written)

One row per result file: the benchmark and scale, linking to its Markdown table (<name>-<scale>.md), its
headline numbers and whether its targets were met. The table replaces whatever stands between README's
lines `<!-- results:begin ...` and `<!-- results:end -->`; a benchmark or scale without a file has no row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BEGIN, END = "<!-- results:begin", "<!-- results:end -->"
NAMES = ("demo", "distill", "labeling", "students", "own_teachers", "tune", "tune_caches", "serve", "cluster", "gpu",
         "precision")
SCALES = ("quick", "full", "transfer")


class MarkersMissing(ValueError):
    """README has no results section to rebuild."""


def _students(r: dict) -> str:
    # the students the issue sets its target for (BiLSTM, CMOW), as the targets name them
    judged = r["targets"]["students_90pct_at_3x"]
    return "score and throughput against the teacher ensemble's: " + ", ".join(
        f"{k} {r['students'][k]['share_of_ensemble_pct']:.1f}% at {r['students'][k]['speedup_vs_ensemble']:.1f}x"
        for k in judged)


HEADLINES = {
    "demo": lambda r: (f"{r['seconds']:.0f} s from an empty storage root; the student at most "
                       f"{max(r['gap_points'].values()):.2f} points below its teacher ensemble"),
    "distill": lambda r: (f"merged student {r['student_share_of_baseline_pct']:.1f}% of full fine-tuning at "
                          f"{r['overhead']:.1%} overhead"),
    "labeling": lambda r: (f"labeling stage {r['k1']['stage_vs_best_baseline']:.2f}x the best single-process "
                           f"baseline" + (f" (median of {len(r['k1']['runs'])} runs, "
                                          f"{r['k1']['spread']['end_to_end'][0]:.2f}-"
                                          f"{r['k1']['spread']['end_to_end'][1]:.2f}x; busy "
                                          f"{r['k1']['spread']['busy'][0]:.2f}-{r['k1']['spread']['busy'][1]:.2f}x)"
                                          if "runs" in r["k1"] else " (one run)")
                           + f"; shared trunk {r['k3']['shared_gain']:.2f}x"),
    "students": _students,
    "own_teachers": lambda r: ("SST-2 teachers fine-tuned outside kdlib (plain transformers), ensemble "
                               f"{next(iter(r['students'].values()))['ensemble_accuracy']:.1f}: " + ", ".join(
        f"{k} student {x['retained_pct']:.1f}% at {x['speedup_vs_ensemble']:.1f}x its speed"
        for k, x in r["students"].items())),
    "tune": lambda r: (f"chosen ({r['chosen']['rule']} {r['chosen']['setting']:g}): "
                       f"{r['chosen']['share_of_full_ft']:.1f}% of full fine-tuning at {r['chosen']['overhead']:.1%} "
                       f"overhead"),
    "tune_caches": lambda r: (f"the sweep {r['wall_speedup']:.2f}x faster with the caches "
                              f"({r['sweep_seconds']['cached']:.0f} s against {r['sweep_seconds']['uncached']:.0f} s)"),
    "serve": lambda r: ("all-task requests/s, merged model / one deployment per task: " + (", ".join(
        f"{r['gains'][f'all_b{b}']['merged_vs_per_task']:.2f}x (batch {b})" for b in r["settings"]["batch_sizes"])
        if not r.get("round_gains") else f"median of {r['settings']['rounds']} rounds " + ", ".join(
            f"{g['median']:.2f}x ({g['min']:.2f}-{g['max']:.2f}x, batch {k.removeprefix('all_b')})"
            for k, g in r["round_gains"].items() if k.startswith("all_")))
        + f"; {r['errors']} errors"),
    "gpu": lambda r: (f"on {r['device_name']}: labeling while busy " + ", ".join(
        f"{r[k]['busy_vs_plain']:.2f}x" for k in r if k.startswith("bound_")) + " a plain bf16 loop (GPU-bound), "
        f"{r['text']['busy_vs_plain']:.2f}x on SST-2 text with tokenization"
        + ("" if "serve" not in r else "; Serve all-task, merged / per-task teachers: " + ", ".join(
            f"{v:.2f}x ({k.replace('all_b', 'batch ')})" for k, v in r["serve"]["merged_vs_per_task"].items()
            if k.startswith("all_")))),
    "precision": lambda r: (f"bf16 / fp32 on this CPU ({r['cpu_bf16'] or 'no native bf16'}): demo pipeline "
                            f"{r['median_round']['demo_gain']:.2f}x faster, labeling "
                            f"{r['median_round']['labeling_gain']:.2f}x"
                            + (f" (median of {r['rounds']} rounds, demo {r['spread']['demo_gain'][0]:.2f}-"
                               f"{r['spread']['demo_gain'][1]:.2f}x)" if r["rounds"] > 1 else " (one round)")
                            + "; students bf16 - fp32 " + ", ".join(
                                f"{t} {d:+.2f}" for t, d in r["median_round"]["student_points"].items()) + " points"),
    "cluster": lambda r: (f"2 worker nodes {r['scaling']['end_to_end']:.2f}x one node end to end "
                          f"({r['scaling']['actors_busy']:.2f}x while the actors are busy); the demo job submitted to a "
                          f"local head node {r['job_overhead']['job_overhead_seconds']:+.0f} s against standalone"),
}


def verdict(targets: dict | None) -> str:
    """"met", "NOT met (the targets missed)", or "-" where the benchmark sets none."""
    if not targets:
        return "-"
    met = targets.get("all_met", targets.get("met", targets))  # students: the targets themselves, one by one
    missed = [name for name, ok in _leaves(met) if not ok]
    if not missed:
        return "met"
    named = [name for name in missed if name]  # a single overall verdict has no name
    return f"NOT met ({', '.join(named)})" if named else "NOT met"


def _leaves(value, name: str = ""):
    """(dotted name, bool) of every yes/no in a target verdict: a bool, or nested dicts of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{name}.{k}" if name else k)
    elif isinstance(value, bool):
        yield name, value


def results_table(results: Path, link_from: Path) -> str:
    """The Markdown table of every <name>-<scale>.json in `results`, links relative to the folder `link_from`."""
    rows = []
    for name in NAMES:
        for scale in SCALES:
            path = Path(results) / f"{name}-{scale}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            try:
                headline = HEADLINES[name](r)
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}: not the results of today's {name} benchmark ({e!r} missing)") from e
            link = Path(os.path.relpath(path.with_suffix(".md"), link_from)).as_posix()
            rows.append(f"| [{name} ({scale})]({link}) | {headline} | {verdict(r.get('targets'))} |")
    return "\n".join(["| benchmark | headline | targets |", "|---|---|---|", *rows])


def update_readme(readme: Path, results: Path) -> bool:
    """Rebuild the table between README's results markers from `results`; True when README changed.

    Raises MarkersMissing, naming the file and the markers, when README has no such section."""
    readme = Path(readme)
    lines = readme.read_text().splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.lstrip().startswith(BEGIN)), None)
    end = None if begin is None else next((i for i in range(begin + 1, len(lines))
                                           if lines[i].strip().startswith(END)), None)
    if end is None:
        raise MarkersMissing(f"{readme} has no results section: it needs a line starting with '{BEGIN}' and, "
                             f"below it, a line '{END}' (the table goes between them)")
    text = "".join(lines[:begin + 1] + ["\n", results_table(results, readme.parent) + "\n", "\n"] + lines[end:])
    if text == "".join(lines):
        return False
    readme.write_text(text)
    return True
