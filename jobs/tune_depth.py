"""Search each task's fine-tuning depth L and distilled branch layers l with Ray Tune; merge the chosen branches.

Standalone (starts an embedded local Ray; configs/tune/demo.yaml by default):
    python jobs/tune_depth.py
    python jobs/tune_depth.py configs/tune/glue_mini.yaml data_dir=$PWD/../shared/data/glue-mini
On a running cluster:
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/tune_depth.py storage_root=$PWD/runs

flexible-multitask-bert-serving sec. 3-4: per task, teachers fine-tune the top L in [N_min, N_max] layers,
students keep l <= l_max of them, and one model serves every task on a shared frozen trunk. Per task one
Tuner (OptunaSearch + ASHA) runs trials on cached trunk states and cached teachers (kdlib/tune/caches.py);
then a rule picks (L, l) per task -- threshold c (sec. 4.2, Table 5) or an exact layer budget B -- and the
chosen branches are merged. Everything lands in <storage_root>/<run_name>/tune/: table.csv, results.json,
summary.md, tasks.png, curve.png, model/. Rerunning with the same storage resumes the sweeps (after Ctrl-C too).
<storage_root>/<run_name>/run.log holds the full log (--verbose: Ray's logs on the console too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import ray

from kdlib import storage
from kdlib.cluster import init_ray
from kdlib.resources import check_cluster_gpus, precision_note
from kdlib.console import on_interrupt, run_log
from kdlib.config_loading import config_and_overrides, dump_config
from kdlib.encoder import EncoderRef
from kdlib.errors import ConfigError, KdlibError
from kdlib.stages import fingerprint
from kdlib.pipeline.data import load_tasks
from kdlib.tune.config import TuneRunConfig, check_feasible, load_tune_config
from kdlib.tune.costs import layer_passes
from kdlib.tune.merged import max_output_difference, merge_choice, save_merged
from kdlib.tune.report import plot_curve, plot_tasks, summary_markdown
from kdlib.tune.search import candidates, finish_used_trials, prepare_teachers, run_task_search, space_pairs
from kdlib.tune.selection import budget_select, curve, threshold_select
from kdlib.tune.settings import TrialSettings
from kdlib.tune.trial import full_fine_tuning_score

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tune" / "demo.yaml"
KEPT = "finished trials and the cached teachers, trunk states and students are kept"


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...]")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs on the console too (ray.verbose=true)")
    a = p.parse_intermixed_args(argv)
    config_path, overrides = config_and_overrides(a.args, DEFAULT_CONFIG)
    return config_path, overrides + ["ray.verbose=true"] * a.verbose


def sweep_key(cfg: TuneRunConfig, settings: TrialSettings) -> str:
    """What a task's sweep explores: rerunning with the same key resumes it, any change starts a new one
    (still reusing every cached teacher, trunk state and student that fits)."""
    return fingerprint(settings.key(), cfg.search.model_dump(include={"min_fine_tune_layers", "max_fine_tune_layers",
                                                                      "max_branch_layers", "num_samples", "sampler"}),
                       cfg.scheduler.model_dump())[:8]


def used_students(cfg: TuneRunConfig, table: pd.DataFrame, n_layers: int) -> set[tuple[str, int, int]]:
    """(task, L, l) of every distilled branch that the configured rules or any point of the curve choose."""
    cands = candidates(table, cfg.search.include_teacher)
    if set(cfg.tasks) - {c.task for c in cands}:
        return set()  # a task with no successful trial: run() reports it
    sel = cfg.selection
    picks = [threshold_select(cands, sel.threshold).choice]
    budget = budget_select(cands, sel.budget, n_layers) if sel.budget else None
    picks += [budget.choice] if budget else []
    used = {(c.task, c.L, c.l) for choice in picks for c in choice.values() if c.source == "student"}
    for point in curve(cands, n_layers, sel.sweep_thresholds, sel.sweep_budgets):
        used |= {(t, L, l) for t, (L, l, source) in point["choice"].items() if source == "student"}
    return used


def run(cfg: TuneRunConfig, config_path: str = "", log=print) -> dict:
    """The whole search: sweeps, selection, merge, report. Returns results.json's content."""
    started = time.perf_counter()
    root = storage.child(cfg.storage_root)  # a local path (made absolute) or a pyarrow.fs URI
    out_dir = storage.child(root, cfg.run_name, "tune")
    encoder = EncoderRef.resolve(cfg.encoder, cfg.seed)
    n_layers = encoder.num_layers()
    check_feasible(cfg, n_layers)  # before any data is read or Ray starts
    dump_config(cfg, storage.child(out_dir, "config.yaml"))
    log(f"[tune] {cfg.run_name}: config {config_path} -> {out_dir} (full log: {storage.child(root, cfg.run_name, 'run.log')})")
    tasks = load_tasks(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, log=log)
    check_cluster_gpus(cfg)  # a GPU setting the cluster cannot give fails here, not as a silent wait
    if note := precision_note(cfg):  # e.g. fp32 on a CPU that multiplies bf16 natively
        log(note)
    settings = {n: TrialSettings.from_config(cfg, d, encoder, root, out_dir) for n, d in tasks.items()}

    s = cfg.search
    sweep_started = time.perf_counter()
    tries_every_L = s.sampler == "brute_force" and s.num_samples >= space_pairs(
        s.min_fine_tune_layers, s.max_fine_tune_layers, s.max_branch_layers)
    if s.caches and tries_every_L:  # every (task, L) teacher before the trials: no trial waits for another's
        prepare_teachers(settings, range(s.min_fine_tune_layers, s.max_fine_tune_layers + 1), n_layers,
                         cpus_per_trial=s.cpus_per_trial, gpus_per_trial=s.gpus_per_trial, log=log)
    tables = []
    for name in tasks:
        tables.append(run_task_search(
            task=name, sweep=f"{name}-{sweep_key(cfg, settings[name])}", settings=settings[name],
            storage_path=storage.child(out_dir, "ray"), min_L=s.min_fine_tune_layers,
            max_L=s.max_fine_tune_layers, max_l=s.max_branch_layers, num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials, cpus_per_trial=s.cpus_per_trial,
            gpus_per_trial=s.gpus_per_trial, sampler=s.sampler,
            epochs=cfg.student.epochs, grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor, max_failures=s.max_failures, seed=cfg.seed, log=log))
    table = pd.concat(tables, ignore_index=True)
    # Selections choose among fully trained branches only: what ASHA stopped and a selection wants is finished.
    table = finish_used_trials(table, settings, lambda t: used_students(cfg, t, n_layers),
                               cpus_per_trial=s.cpus_per_trial, gpus_per_trial=s.gpus_per_trial, log=log)
    storage.write_text_at(storage.child(out_dir, "table.csv"), table.to_csv(index=False))
    sweep_seconds = time.perf_counter() - sweep_started
    reference = None
    if cfg.reference.full_fine_tuning:  # after the sweeps, so their wall time is theirs alone
        remote = ray.remote(num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)(full_fine_tuning_score)
        refs = {n: remote.remote(settings[n], n_layers) for n in tasks}
        reference = {n: float(ray.get(ref)) for n, ref in refs.items()}
        log(f"[tune] full fine-tuning reference: {reference}")

    cands = candidates(table, s.include_teacher)
    missing = sorted(set(tasks) - {c.task for c in cands})
    if missing:
        raise KdlibError(f"no successful trial for tasks {missing}; see {storage.child(out_dir, 'table.csv')}")
    by_threshold = threshold_select(cands, cfg.selection.threshold)
    budget = cfg.selection.budget or by_threshold.total_layers(n_layers)
    by_budget = budget_select(cands, budget, n_layers)
    if cfg.selection.rule == "budget" and by_budget is None:
        raise ConfigError(f"selection.budget={budget}: no combination of the tried branches fits "
                          f"(see {storage.child(out_dir, 'table.csv')})")
    chosen, other = (by_budget, by_threshold) if cfg.selection.rule == "budget" else (by_threshold, by_budget)

    merged, singles = merge_choice(encoder.load(), chosen.choice, cfg.encoder.pooling)
    texts = {n: (d.dev["text"].tolist(), None if d.dev["text_pair"].iloc[0] is None else d.dev["text_pair"].tolist())
             for n, d in tasks.items()}
    diffs = max_output_difference(merged, singles, encoder.tokenizer(), texts, cfg.encoder.max_length)
    points = curve(cands, n_layers, cfg.selection.sweep_thresholds, cfg.selection.sweep_budgets)
    ref_avg = sum(reference.values()) / len(reference) if reference else None
    for p in points:
        p["share_of_full_ft"] = 100 * p["average"] / ref_avg if ref_avg else None
    summary = {"rule": chosen.rule, "setting": chosen.setting, "average": chosen.average(),
               "overhead": chosen.overhead(n_layers), "total_layers": chosen.total_layers(n_layers),
               "share_of_full_ft": 100 * chosen.average() / ref_avg if ref_avg else None}
    with storage.staged_dir(out_dir) as local_out:  # the model and plots (uploaded at the end if remote)
        save_merged(merged, local_out / "model",
                    tasks={n: {"kind": d.kind, "label_names": d.label_names, "metric": d.metric,
                               "pair": cfg.tasks[n].text_pair_column is not None} for n, d in tasks.items()},
                    extra={"encoder": encoder.manifest(), "max_length": cfg.encoder.max_length,
                           "selection": {"rule": chosen.rule, "setting": chosen.setting}})
        plot_tasks(cands, local_out / "tasks.png")
        plot_curve(points, summary, ref_avg, local_out / "curve.png")
    rows = {n: (len(d.train), len(d.dev)) for n, d in tasks.items()}
    cost = {c: layer_passes(table, encoder_layers=n_layers, rows=rows, members=cfg.teachers.members,
                            teacher_epochs=cfg.teachers.epochs, cached=c,
                            scored_epochs=next(iter(settings.values())).scored_epochs)
            for c in (True, False)}
    results = {"run_name": cfg.run_name, "encoder_layers": n_layers, "chosen": summary,
               "choice": {t: c.to_dict() for t, c in chosen.choice.items()}, "reasons": chosen.reasons,
               "other_rule": None if other is None else {
                   "rule": other.rule, "setting": other.setting, "average": other.average(),
                   "overhead": other.overhead(n_layers), "choice": {t: [c.L, c.l, c.source] for t, c in other.choice.items()}},
               "full_fine_tuning": reference, "max_output_difference": diffs, "curve": points,
               "trials": len(table), "failed_trials": table[table["status"] == "error"][["task", "L", "l", "error"]]
               .to_dict("records"), "layer_passes": {"cached": cost[True], "uncached": cost[False],
                                                    "theoretical_speedup": cost[False] / max(1, cost[True])},
               "sweep_seconds": round(sweep_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
               "model_dir": storage.child(out_dir, "model"), "out_dir": out_dir}
    storage.write_text_at(storage.child(out_dir, "results.json"), json.dumps(results, indent=2, default=str))
    storage.write_text_at(storage.child(out_dir, "summary.md"), summary_markdown(
        run_name=cfg.run_name, chosen=chosen, other=other, encoder_layers=n_layers, reference=reference,
        table=table, diffs=diffs, seconds=results["seconds"], cands=cands))
    return results


def benchmark(config: str, overrides: list[str], storage_root: str, modes=("cached", "uncached")) -> dict:
    """For jobs/benchmark.py: the sweep with caches and/or without, each from empty storage, in one run.

    Returns {mode: results} for each mode run (results hold the merged model's share of full fine-tuning and
    overhead for every c and B tried, "curve"); with both modes also "wall_speedup" and "theoretical_speedup".
    Only the cached sweep trains the full fine-tuning reference (after its sweep, outside its wall time).
    """
    out = {}
    for mode in modes:
        cached = mode == "cached"
        cfg = load_tune_config(config, overrides + [f"storage_root={Path(storage_root) / mode}",
                                                    f"search.caches={str(cached).lower()}"]
                               + ([] if cached else ["reference.full_fine_tuning=false"]))
        started = time.perf_counter()
        out[mode] = dict(run(cfg, config), wall_seconds=time.perf_counter() - started)
    if set(out) == {"cached", "uncached"}:
        c, u = out["cached"], out["uncached"]
        out["wall_speedup"] = u["sweep_seconds"] / c["sweep_seconds"]
        out["theoretical_speedup"] = c["layer_passes"]["theoretical_speedup"]
    return out


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_tune_config(config_path, overrides)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with run_log(storage.child(cfg.storage_root, cfg.run_name), verbose=cfg.ray.verbose) as log, on_interrupt(KEPT):
        try:
            results = run(cfg, config_path, log=log)
        except KdlibError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log(storage.read_text_at(storage.child(results["out_dir"], "summary.md")))
        log(f"results: {results['out_dir']}/results.json ({results['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
