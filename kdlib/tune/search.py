"""One Ray Tune sweep per task over (L, l): OptunaSearch proposes, ASHA stops weak trials early.

A sweep lives in `<storage_path>/<task>-<settings key>/` (a local path or a pyarrow.fs URI); rerunning with the same storage and settings restores it
(`Tuner.can_restore` / `Tuner.restore`): finished trials are kept, unfinished ones rerun, and a rerun
trial whose student is already in the cache only replays its stored scores. A failing trial is
recorded (`ResultGrid.errors`) and the sweep goes on. Each trial writes its reports (score, epoch, ...) as
TensorBoard event files into its trial folder (Tune's TBXLoggerCallback): `tensorboard --logdir <sweep>`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
import pandas as pd
import pyarrow.fs as pafs

from kdlib import storage
from kdlib.tune.selection import Candidate
from kdlib.tune.trial import finish_trial, prepare_cached, run_trial

TABLE_COLUMNS = ["task", "L", "l", "status", "score", "epochs", "stopped_early", "finished_after_stop", "cached",
                 "teacher_score",
                 "teacher_best_member", "depth", "computed_teacher", "computed_trunk_states", "seconds",
                 "student_dir", "teacher_branch_dir", "gpus", "device", "error", "trial_id"]


@dataclass(frozen=True)
class DepthSpace:
    """Optuna define-by-run space: L in [N_min, N_max], then l in [1, min(l_max, L)] (a branch is cut from L).

    A module-level class, not a closure: Tune pickles the searcher into its experiment state for resume.
    """

    min_L: int
    max_L: int
    max_l: int

    def __call__(self, trial) -> None:
        L = trial.suggest_int("L", self.min_L, self.max_L)
        trial.suggest_int("l", 1, min(self.max_l, L))


def scored_epochs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs after which a trial scores dev: the first epoch at or past each of ASHA's rungs
    (grace_period x reduction_factor^k below `epochs`, as ray.tune.schedulers.ASHAScheduler places them)
    and the last epoch.

    ASHA decides a rung at the first report whose epoch reaches it, so a dev pass at any other epoch
    would be read by no one; skipping them leaves every decision and every final score as they were.
    """
    rungs = math.floor(math.log(epochs / grace_period) / math.log(reduction_factor)) + 1
    return sorted({math.ceil(grace_period * reduction_factor ** k) for k in range(rungs)} | {epochs})


def space_pairs(min_L: int, max_L: int, max_l: int) -> int:
    """How many (L, l) pairs the search space holds (DepthSpace: l in [1, min(l_max, L)])."""
    return sum(min(max_l, L) for L in range(min_L, max_L + 1))


def run_task_search(*, task: str, sweep: str, settings: dict, storage_path: str, min_L: int, max_L: int, max_l: int,
                    num_samples: int, max_concurrent_trials: int, cpus_per_trial: float, sampler: str,
                    gpus_per_trial: float = 0.0,
                    epochs: int, grace_period: int, reduction_factor: float, max_failures: int, seed: int,
                    log=print) -> pd.DataFrame:
    """Run (or resume) the sweep of one task in `<storage_path>/<sweep>`; one row per trial (TABLE_COLUMNS)."""
    import optuna
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    # Ctrl-C stops the job (kdlib.console.on_interrupt), not only the sweep: Tune's own handler would end the
    # sweep and hand the job a partial table to select from. Tune saves its state as trials end; a rerun resumes.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # verbose=0 (below) silences Tune's legacy output engine; the new one prints each experiment's header anyway.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Optuna's records go where the job's logging sends them (kdlib.console: run.log), not to its own handler.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    location = storage.child(storage_path, sweep)
    fs, path = storage.filesystem(location)
    custom_fs = None if storage.is_local(location) else fs  # Tune takes a URI's filesystem, not its query string
    saved = [n for n in storage.list_names(fs, path, ".json") if n.startswith("experiment_state-")]
    if tune.Tuner.can_restore(path, storage_filesystem=custom_fs) and not saved:
        # A driver that died before Tune saved its first state left only the Tuner: nothing to resume.
        storage.delete_dir(location)
    if tune.Tuner.can_restore(path, storage_filesystem=custom_fs):
        log(f"[tune:{task}] resuming the sweep in {location}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=custom_fs)
    else:
        # metric/mode go to the searcher and scheduler themselves: a define-by-run OptunaSearch is not
        # handed TuneConfig's.
        warnings.filterwarnings("ignore", message="BruteForceSampler is experimental")
        samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                    "brute_force": lambda: optuna.samplers.BruteForceSampler(seed=seed)}
        search = OptunaSearch(space=DepthSpace(min_L, max_L, max_l), metric="score", mode="max", sampler=samplers[sampler]())
        # time_attr "epoch": a trial reports at scored_epochs only, so its reports are not its epochs
        scheduler = ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=epochs, grace_period=grace_period,
                                  reduction_factor=reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, reuse_actors=True, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=storage.filesystem(storage_path)[1], storage_filesystem=custom_fs,
                                      name=sweep, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      # Tune adds it by default unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1: the
                                      # trials' curves are kept either way.
                                      callbacks=[TBXLoggerCallback()]),
        )
        log(f"[tune:{task}] {num_samples} trials over L in [{min_L}, {max_L}], l in [1, {max_l}] -> {location}")
    grid = tuner.fit()
    rows = [result_row(task, r, epochs) for r in grid]
    for err in grid.errors:
        log(f"[tune:{task}] a trial failed (reported, the sweep went on): {_first_line(err)}")
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def result_row(task: str, result, epochs: int) -> dict:
    m, cfg = result.metrics or {}, result.config or {}
    fs = getattr(result, "filesystem", None) or pafs.LocalFileSystem()
    params = storage.join(result.path or "", "params.json")
    if "L" not in cfg and result.path and storage.exists(fs, params):  # a restored errored trial lacks its config
        cfg = json.loads(storage.read_bytes(fs, params))
    failed = result.error is not None
    done = int(m.get("epoch", 0))
    return {"task": task, "L": int(cfg.get("L", m.get("L", -1))), "l": int(cfg.get("l", m.get("l", -1))),
            "status": "error" if failed else "ok", "score": m.get("score", math.nan), "epochs": done,
            "stopped_early": (not failed) and done < epochs, "finished_after_stop": False, "cached": m.get("cached"),
            "teacher_score": m.get("teacher_score", math.nan), "teacher_best_member": m.get("teacher_best_member", math.nan),
            "depth": m.get("depth"), "computed_teacher": m.get("computed_teacher"),
            "computed_trunk_states": m.get("computed_trunk_states"), "seconds": m.get("seconds"),
            "student_dir": m.get("student_dir"), "teacher_branch_dir": m.get("teacher_branch_dir"),
            "gpus": m.get("gpus"), "device": m.get("device"), "error": _first_line(result.error) if failed else None, "trial_id": m.get("trial_id")}


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    hit = [t for t in text if "injected failure" in t or "Error" in t]
    return (hit[-1] if hit else (text[-1] if text else repr(err)))[:300]


def candidates(table: pd.DataFrame, include_teacher: bool) -> list[Candidate]:
    """Branches the selection may use: each distinct (L, l) student that reported a score (its best
    report if repeated), plus (include_teacher) each tried L's best member undistilled as l = L."""
    ok = table[(table["status"] == "ok") & table["score"].notna() & table["teacher_score"].notna()]
    out = []
    for (task, L, l), g in ok.groupby(["task", "L", "l"]):
        r = g.sort_values("score", ascending=False).iloc[0]
        out.append(Candidate(task, int(L), int(l), float(r["score"]), float(r["teacher_score"]), "student",
                             r["student_dir"]))
    if include_teacher:
        for (task, L), g in ok.groupby(["task", "L"]):
            r = g.iloc[0]
            out.append(Candidate(task, int(L), int(L), float(r["teacher_best_member"]), float(r["teacher_score"]),
                                 "teacher", r["teacher_branch_dir"]))
    return out


def prepare_teachers(settings: dict[str, dict], fine_tune_layers: range, encoder_layers: int, *,
                     cpus_per_trial: float, gpus_per_trial: float = 0.0, log=print) -> None:
    """With caches, before sweeps that try every L: each task's teacher, trunk states and teacher outputs
    for every L, as Ray tasks in parallel (kdlib.tune.trial.prepare_cached; entries already cached are
    left alone).

    Done lazily by the trials instead, two concurrent trials that need the same (task, L) teacher would
    leave one waiting at its lock, holding its CPU, for the whole teacher training. A preparation that
    fails is logged and left to the trials that need it (which retry it and, failing again, are reported
    as failed trials).
    """
    import ray

    remote = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)(prepare_cached)
    refs = {(task, L): remote.remote(s, L, encoder_layers) for task, s in settings.items() for L in fine_tune_layers}
    log(f"[tune] preparing {len(refs)} teachers (trunk states, teacher logits) for the sweeps: L in "
        f"[{fine_tune_layers.start}, {fine_tune_layers.stop - 1}] for {', '.join(settings)}")
    for (task, L), ref in refs.items():
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001 - any failure is the trials' to meet and report
            log(f"[tune:{task}] preparing L={L} failed (its trials will retry it): {_first_line(err)}")


def finish_used_trials(table: pd.DataFrame, settings: dict[str, dict], used, *, cpus_per_trial: float,
                       gpus_per_trial: float = 0.0, log=print) -> pd.DataFrame:
    """Train to their last epoch the trials ASHA stopped early that a selection uses, then select again,
    until every branch any selection uses is fully trained.

    ASHA stops a trial on its score after a few epochs; that partial score is fine for deciding where to
    search, not for choosing what goes into the merged model (a stopped branch would compete with its
    half-trained score, and be merged half-trained). `used(table)` gives the (task, L, l) students the
    selections pick from `table`. The stopped trials run again as Ray tasks, in parallel, sharing the
    sweep's caches (kdlib.tune.trial.finish_trial); their rows get the final score and
    finished_after_stop = True.
    """
    import ray

    remote = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)(finish_trial)
    table = table.copy()
    while True:
        stopped = table[(table["status"] == "ok") & table["stopped_early"].astype(bool)]
        todo = sorted(set(zip(stopped["task"], stopped["L"], stopped["l"])) & set(used(table)))
        if not todo:
            return table
        log(f"[tune] training {len(todo)} branches that ASHA stopped early and a selection uses to their last epoch: "
            + ", ".join(f"{t} (L={L}, l={l})" for t, L, l in todo))
        refs = {key: remote.remote(settings[key[0]], int(key[1]), int(key[2])) for key in todo}
        for (task, L, l), ref in refs.items():
            out = ray.get(ref)
            rows = (table["task"] == task) & (table["L"] == L) & (table["l"] == l)
            table.loc[rows, "score"] = out["score"]
            table.loc[rows, "epochs"] = out["epochs"]
            table.loc[rows, "student_dir"] = out["student_dir"]
            table.loc[rows, "stopped_early"] = False
            table.loc[rows, "finished_after_stop"] = True
