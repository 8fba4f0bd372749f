"""One search trial: (task, L, l) -> a student branch of l layers distilled from the (task, L) teacher.

What a trial needs is cached (kdlib.tune.caches): the teacher ensemble that fine-tuned the top L layers
(kdlib.pipeline.teachers, trained by the first trial that needs it), the frozen trunk's states at
depth N - L for train and dev, and the teacher's logits on them. So a trial trains only its l layers and
head (Hinton KD against the ensemble, flexible-multitask-bert-serving sec. 3.2, initialised from the best
member's bottommost l fine-tuned layers) and scores dev after the epochs ASHA decides at and the last
(settings.scored_epochs, kdlib.tune.search.scored_epochs): one `tune.report` each, which is what ASHA
stops on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
from safetensors.torch import load_file, save_file

from kdlib import storage
from kdlib.artifact import load_model, save_model
from kdlib.branched import BranchedModel, member_name
from kdlib.device import autocast, device, model_device, out_of_memory_names
from kdlib.features import TrunkFeatures, length_grouped_batches
from kdlib.losses import ensemble_target, kd_classification_loss, kd_regression_loss
from kdlib.merge import build_student, single_task
from kdlib.metrics import task_metrics
from kdlib.optim import Optimization
from kdlib.pipeline.teachers import teacher_key, train_teacher_ensemble
from kdlib.scoring import ensemble_outputs, member_scores
from kdlib.stages import fingerprint
from kdlib.tune import caches

if TYPE_CHECKING:
    from kdlib.tune.settings import TrialSettings


def teacher_fingerprint(s: TrialSettings, L: int, members: int | None = None) -> str:
    """The teachers stage key of the pipeline, so both jobs share one trained ensemble per (task, L, seed)."""
    return teacher_key(s.encoder, s.data.digest, L, s.teachers, members=members, precision=s.precision)


def student_fingerprint(s: TrialSettings, L: int, l: int) -> str:
    return fingerprint("tune-student", teacher_fingerprint(s, L), l, s.student.model_dump(), s.aggregation,
                       s.wrong_teacher_weight, s.seed, *([] if s.precision == "fp32" else [s.precision]))


def ensure_teacher(s: TrialSettings, L: int, location: str, members: int | None = None) -> tuple[Path, bool]:
    """The (task, L) ensemble artifact at `location` (trained here unless done); (its folder on this node,
    trained now)."""

    def build(out: Path) -> dict:
        info = train_teacher_ensemble(s.data, s.encoder, L, s.teachers, str(out / "ensemble"), members=members,
                                      precision=s.precision, log=lambda *_: None)
        return {"task": s.task, "L": L, "train_seconds": info["seconds"]}

    out, trained = caches.once(location, build, "teacher")
    return out / "ensemble", trained


def compute_states(s: TrialSettings, model: BranchedModel, depth: int, split: str) -> TrunkFeatures:
    frame = s.split(split)
    pairs = frame["text_pair"].tolist()
    return TrunkFeatures.compute(model, s.encoder.tokenizer(), frame["text"].tolist(),
                                 pairs if pairs and pairs[0] is not None else [None], depth=depth,
                                 max_length=s.encoder.max_length)


@torch.no_grad()
def branch_outputs(model: BranchedModel, name: str, feats: TrunkFeatures, batch_size: int = 128) -> np.ndarray:
    """(N, C) outputs of branch `name` on cached trunk states, in example order."""
    model.eval()
    order = np.argsort(feats.lengths, kind="stable")
    out = [None] * len(feats)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        h, mask = feats.batch(idx)
        dev = model_device(model)
        y = model.branch_forward(name, h.to(dev), mask.to(dev)).float().cpu().numpy()
        for row, j in enumerate(idx):
            out[j] = y[row]
    return np.stack(out)


def labels_of(s: TrialSettings, split: str) -> np.ndarray:
    return s.split(split)["label"].to_numpy()


def teacher_outputs(s: TrialSettings, ensemble: BranchedModel, feats: dict[str, TrunkFeatures], L: int) -> dict:
    """Every member's logits on train and dev (N, K, C), member and ensemble dev scores, the best member."""
    members = s.teachers.members
    logits = {sp: np.stack([branch_outputs(ensemble, member_name(s.task, k), feats[sp]) for k in range(members)],
                           axis=1) for sp in ("train", "dev")}
    scores = member_scores(s.data.kind, s.data.metric, labels_of(s, "dev"), logits["dev"])
    ens = task_metrics(s.data.kind, ensemble_outputs(logits["dev"], s.data.kind, s.aggregation,
                                                   s.student.temperature), labels_of(s, "dev"))[s.data.metric]
    best = int(np.argmax(scores))
    return {"logits": logits, "member_scores": scores, "ensemble_score": ens, "best_member": best}


def save_teacher_outputs(out: Path, s: TrialSettings, encoder, ensemble: BranchedModel, info: dict, L: int) -> dict:
    """Logits, scores, and the undistilled candidate (the best member as a branch named after the task)."""
    save_file({sp: torch.from_numpy(v) for sp, v in info["logits"].items()}, str(out / "logits.safetensors"))
    branch = build_student(encoder, {s.task: (ensemble, member_name(s.task, info["best_member"]))},
                           {s.task: L}, s.encoder.pooling)
    save_model(single_task(branch, s.task), out / "branch", include_trunk=False, tasks=_task_meta(s),
               extra={"role": "tune_teacher_branch", "L": L, "l": L})
    meta = {k: info[k] for k in ("member_scores", "ensemble_score", "best_member")}
    (out / "scores.json").write_text(json.dumps(meta))
    return meta


def load_teacher_outputs(out: Path) -> dict:
    data = load_file(str(out / "logits.safetensors"))
    return {"logits": {k: v.numpy() for k, v in data.items()}, **json.loads((out / "scores.json").read_text())}


def _task_meta(s: TrialSettings) -> dict:
    return {s.task: {"kind": s.data.kind, "label_names": s.data.label_names, "metric": s.data.metric}}


def prepare(s: TrialSettings, L: int, scratch: Path | None) -> dict:
    """Teacher, trunk states and teacher outputs for (task, L): from the caches, or into `scratch` without them.

    Returns:
        {"encoder", "ensemble", "feats", "teacher", "teacher_outputs" (where "teacher" is stored), "depth",
         "computed": {what this call computed}}.
    """
    encoder = s.encoder.load()
    depth = encoder.config.num_hidden_layers - L
    entries = cache_entries(s, L, encoder.config.num_hidden_layers, scratch)
    teacher_dir, trained = ensure_teacher(s, L, entries["teacher"])
    ensemble, _ = load_model(teacher_dir, encoder=encoder)
    feats, computed = caches.trunk_states(entries["trunk_states"], lambda split: compute_states(s, ensemble, depth, split))
    outputs = entries["teacher_outputs"]
    folder, labeled = caches.once(outputs, lambda out: save_teacher_outputs(out, s, encoder, ensemble,
                                                                            teacher_outputs(s, ensemble, feats, L), L),
                                  "teacher_outputs")
    return {"encoder": encoder, "ensemble": ensemble, "feats": feats, "teacher": load_teacher_outputs(folder),
            "teacher_outputs": outputs, "depth": depth,
            "computed": {"teacher": trained, "trunk_states": computed, "teacher_outputs": labeled}}


def cache_entries(s: TrialSettings, L: int, encoder_layers: int, scratch: Path | None = None) -> dict[str, str]:
    """Where `prepare` keeps the (task, L) teacher, trunk states and teacher outputs: shared cache entries
    under the storage root, or the trial's private scratch folder (caches off)."""
    def entry(kind: str, key: str) -> str:
        return str(scratch / key) if scratch else storage.child(s.storage_root, "cache", kind, key)

    tfp, depth = teacher_fingerprint(s, L), encoder_layers - L
    states_key = fingerprint("trunk-states", s.encoder.fingerprint, s.data.digest, depth, s.encoder.max_length)
    return {"teacher": entry("teachers", tfp), "trunk_states": entry(f"trunk_states/{s.task}", states_key),
            "teacher_outputs": entry("tune_teacher_outputs", f"{tfp}-outputs")}


def prepare_cached(settings: TrialSettings, L: int, encoder_layers: int) -> dict:
    """`prepare` into the shared caches, as a Ray task of its own (kdlib.tune.search.prepare_teachers),
    unless all three entries are cached already: what it computed."""
    if all(caches.is_done(e) for e in cache_entries(settings, L, encoder_layers).values()):
        return {"teacher": False, "trunk_states": False, "teacher_outputs": False}
    torch.set_num_threads(settings.torch_threads)
    return prepare(settings, L, None)["computed"]


def distill_student(s: TrialSettings, prep: dict, L: int, l: int, out: Path, report,
                    publish=lambda: None) -> list[list[float]]:
    """Train the l-layer branch on cached states against the teacher ensemble; `report(epoch, score, scores,
    last)` after each epoch in settings.scored_epochs and the last (`scores`: [[epoch, score], ...]).

    The student is saved to `out/student` before each score is reported, so a trial that ASHA stops
    leaves the artifact its last reported score belongs to.
    """
    task, st = s.task, s.student
    feats, teacher = prep["feats"], prep["teacher"]
    student = build_student(prep["encoder"], {task: (prep["ensemble"], member_name(task, teacher["best_member"]))},
                            {task: l}, s.encoder.pooling)
    kind = s.data.kind
    y = torch.tensor(labels_of(s, "train"), dtype=torch.long if kind == "classification" else torch.float32)
    target = ensemble_target(torch.from_numpy(teacher["logits"]["train"]), s.aggregation, st.temperature,
                             labels=y if kind == "classification" else None,
                             wrong_weight=s.wrong_teacher_weight)  # (N, C)
    dev = device()  # the GPU this trial asked for (search.gpus_per_trial), else the CPU
    student.to(dev)
    branch = student.branches[task]
    opt = Optimization(branch.parameters(), lr=st.lr, weight_decay=st.weight_decay, schedule="warmup_linear",
                       total_steps=st.epochs * int(np.ceil(len(feats["train"]) / st.batch_size)),
                       precision=s.precision, device=dev)
    rng, scores = np.random.default_rng(s.seed), []
    torch.manual_seed(s.seed)
    for epoch in range(st.epochs):
        branch.train()
        for idx in length_grouped_batches(feats["train"].lengths, st.batch_size, rng):
            h, mask = feats["train"].batch(idx)  # (B, T, H), (B, T)
            opt.zero_grad()
            with out_of_memory_names("student.batch_size", st.batch_size, task, dev):
                with autocast(dev, s.precision):
                    pred = student.branch_forward(task, h.to(dev), mask.to(dev)).float()  # (B, C)
                if kind == "classification":
                    loss = kd_classification_loss(pred, target[idx].to(dev), y[idx].to(dev), st.temperature, st.alpha)
                else:
                    loss = kd_regression_loss(pred, target[idx].to(dev), y[idx].to(dev), st.alpha)
                opt.backward(loss)
            opt.step()
        last = epoch + 1 == st.epochs
        if not last and epoch + 1 not in s.scored_epochs:
            continue
        score = task_metrics(kind, branch_outputs(student, task, feats["dev"]), labels_of(s, "dev"))[s.data.metric]
        scores.append([epoch + 1, score])
        save_model(single_task(student, task), out / "student", include_trunk=False, tasks=_task_meta(s),
                   extra={"role": "tune_student", "L": L, "l": l, "epochs_done": epoch + 1, "scores": scores})
        publish()  # in the storage before its score is reported: Tune may stop the trial at any report
        report(epoch, score, [list(x) for x in scores], last)
    return scores


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Ray Tune function trainable: `config` holds the sampled L and l; `settings` everything else (plain data)."""
    from ray import tune

    s = settings
    torch.set_num_threads(s.torch_threads)
    task, L, l = s.task, int(config["L"]), int(config["l"])
    if f"{task}:{L}:{l}" in s.inject_failures:
        raise RuntimeError(f"injected failure (search.inject_failures) in trial {task} L={L} l={l}")
    scratch, student_dir = _trial_dirs(s, L, l)
    try:
        _run_trial(s, task, L, l, scratch, student_dir, tune)
    finally:
        _drop(scratch)


def _run_trial(s: TrialSettings, task: str, L: int, l: int, scratch: Path | None, student_dir: str, tune) -> None:
    started = time.perf_counter()
    # the GPU share Ray gave this trial (search.gpus_per_trial) and the device it runs on, in every report
    where = {"gpus": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0), "device": str(device())}
    base = {**_base(L, l, student_dir), **where}

    if caches.is_done(student_dir):  # the same (L, l) finished before (a duplicate sample, or a resumed sweep)
        _replay(s, student_dir, base, tune)
        return
    with caches.locked(student_dir):
        if caches.is_done(student_dir):
            _replay(s, student_dir, base, tune)
            return
        caches.clear_unfinished(student_dir)
        _train_student(s, L, l, scratch, student_dir, lambda base, epoch, score: tune.report(
            {**base, **where, "score": score, "epoch": epoch + 1, "cached": False, "seconds": round(time.perf_counter() - started, 2)}))


def finish_trial(settings: TrialSettings, L: int, l: int) -> dict:
    """Train (L, l) for all its epochs outside Tune: a trial ASHA stopped early whose branch a selection
    wants, so that the merged model (and the curve) use a fully trained branch, not a partial score.

    Shares the trial's caches: the teacher and trunk states are reused, and the finished student is stored
    where a later trial with the same (L, l) replays it. Returns {"score", "epochs", "student_dir"}.
    """
    s = settings
    torch.set_num_threads(s.torch_threads)
    scratch, student_dir = _trial_dirs(s, L, l)
    try:
        return _finish_trial(s, L, l, scratch, student_dir)
    finally:
        _drop(scratch)


def _finish_trial(s: TrialSettings, L: int, l: int, scratch: Path | None, student_dir: str) -> dict:
    with caches.locked(student_dir):
        if not caches.is_done(student_dir):
            caches.clear_unfinished(student_dir)
            _train_student(s, L, l, scratch, student_dir, lambda *_: None, finished_after_stop=True)
        epoch, score = epoch_scores(caches.done_info(student_dir))[-1]
    return {"score": score, "epochs": epoch, "student_dir": storage.child(student_dir, "student")}


def epoch_scores(done: dict) -> list[tuple[int, float]]:
    """(epoch, dev score) pairs of a finished student entry (entries from before scored_epochs hold one
    score per epoch)."""
    scores = done["scores"]
    return [tuple(x) if isinstance(x, list) else (i + 1, x) for i, x in enumerate(scores)]


def _train_student(s: TrialSettings, L: int, l: int, scratch: Path | None, student_dir: str, on_epoch, **facts) -> None:
    """Distil the (L, l) student into its entry: the artifact published after every epoch, then
    `on_epoch(base, epoch, score)`; the entry marked done (with its scores and `facts`) before the last call."""
    prep = prepare(s, L, scratch)
    base = _base(L, l, student_dir, prep)
    with storage.staged_dir(student_dir) as out:

        def report(epoch: int, score: float, scores: list[list[float]], last: bool) -> None:
            if last:  # before the last report: Tune may end the trial there (max_t reached)
                caches.mark_done(student_dir, {"kind": "student", "task": s.task, "L": L, "l": l, "scores": scores,
                                               **facts, "base": {k: v for k, v in base.items()
                                                                 if not k.startswith("computed_")}})
            on_epoch(base, epoch, score)

        distill_student(s, prep, L, l, out, report, lambda: caches.publish(out, student_dir, "student"))


def _base(L: int, l: int, student_dir: str, prep: dict | None = None) -> dict:
    """What every report of an (L, l) trial carries besides its score (the teacher's facts once prepared)."""
    base = {"L": L, "l": l, "branch_layers": l, "fine_tune_layers": L, "student_dir": storage.child(student_dir, "student")}
    if prep is not None:
        t = prep["teacher"]
        base.update(depth=prep["depth"], teacher_score=t["ensemble_score"], teacher_best_member=max(t["member_scores"]),
                    teacher_branch_dir=storage.child(prep["teacher_outputs"], "branch"),
                    **{f"computed_{k}": v for k, v in prep["computed"].items()})
    return base


def _trial_dirs(s: TrialSettings, L: int, l: int) -> tuple[Path | None, str]:
    """(a private scratch folder on this node when caches are off, else None; the (L, l) student's location).

    Without caches the teacher, trunk states and teacher outputs go to the scratch folder (removed after the
    trial), and the student to the run folder, where the merge finds it."""
    fp = student_fingerprint(s, L, l)
    if s.caches:
        return None, storage.child(s.storage_root, "cache", "tune_students", fp)
    private = f"{s.task}-L{L}-l{l}-{uuid.uuid4().hex[:6]}"
    return Path(tempfile.mkdtemp(prefix=f"kdlib-{private}-")), storage.child(s.run_dir, "nocache", private, fp)


def _drop(scratch: Path | None) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _replay(s: TrialSettings, student_dir: str, base: dict, tune) -> None:
    """Report a finished student's stored scores again, at this sweep's scored epochs only (the student
    may have been trained, and scored, under other scheduler settings: its weights do not depend on them)."""
    done = caches.done_info(student_dir)
    stored = epoch_scores(done)
    for epoch, score in stored:
        if epoch not in s.scored_epochs and epoch != stored[-1][0]:
            continue
        tune.report({**base, **done["base"], "score": score, "epoch": epoch, "cached": True, "seconds": 0.0,
                     "computed_teacher": False, "computed_trunk_states": False, "computed_teacher_outputs": False})


def full_fine_tuning_score(s: TrialSettings, encoder_layers: int) -> float:
    """Dev score of one member fine-tuning all N layers: the reference the paper's shares are taken of.

    The artifact is the teachers stage of a members = 1, L = N run, the same one jobs/benchmark.py's
    baseline trains, so either job reuses the other's.
    """
    from kdlib.predict import predict

    torch.set_num_threads(s.torch_threads)
    location = storage.child(s.storage_root, "cache", "teachers", teacher_fingerprint(s, encoder_layers, members=1))
    artifact, _ = ensure_teacher(s, encoder_layers, location, members=1)
    model, _ = load_model(artifact, encoder=s.encoder.load())
    dev = s.data.dev
    pairs = dev["text_pair"].tolist()
    name = member_name(s.task, 0)
    out = predict(model, s.encoder.tokenizer(), dev["text"].tolist(),
                  None if not pairs or pairs[0] is None else pairs, [name], max_length=s.encoder.max_length)[name]
    return task_metrics(s.data.kind, out, labels_of(s, "dev"))[s.data.metric]
