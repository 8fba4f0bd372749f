"""Distil per-task teacher ensembles into one merged multi-task student, end to end on Ray.

Standalone (starts an embedded local Ray; the demo config by default):
    python jobs/distill.py
    python jobs/distill.py configs/glue_mini.yaml data_dir=../shared/data/glue-mini
On a running cluster (`ray start --head`, then):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py storage_root=$PWD/runs

Stages, each cached under <storage_root>/cache/<stage>/<fingerprint> so unchanged inputs are reused:
  data -> teachers (Ray tasks) -> labels (Ray Data actor pool -> soft-target store, resumable shards)
  -> distill (Ray Train; with labeling.stream it consumes the training shards as they are labeled)
  -> merge (one safetensors artifact) -> evaluate (table in <storage_root>/<run_name>/).
The soft-target store (<storage_root>/soft_targets/<task>/<key>/) is shared by every run with the same
data, augmentation and teachers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import pandas as pd
import ray
from ray.train import Checkpoint

from kdlib import storage
from kdlib.artifact import load_model, save_model
from kdlib.augment import file_digest, masked_copies, read_unlabeled
from kdlib.branched import member_name
from kdlib.cluster import init_ray
from kdlib.config import RunConfig, load_run_config
from kdlib.config_loading import config_and_overrides, dump_config
from kdlib.distill import load_trained_student, run_distillation
from kdlib.encoder import (
    encoder_fingerprint,
    load_encoder,
    load_tokenizer,
    resolve_encoder_path,
)
from kdlib.errors import ConfigError, KdlibError
from kdlib.evaluate import markdown_table, member_scores, score_task, summary_rows
from kdlib.labeling import ProgressReporter, labeling_dataset, pending, run_labeling
from kdlib.merge import merge, overhead, single_task
from kdlib.predict import predict, predict_student
from kdlib.soft_targets import (
    SoftTargetStore,
    carry_over,
    gold_only_dataset,
    plan_shards,
    teacher_logits_array,
)
from kdlib.stages import StageCache, fingerprint
from kdlib.students.artifact import load_student, save_student
from kdlib.students.binning import ScoreBins
from kdlib.students.registry import count_parameters
from kdlib.tasks import TaskData, load_tasks
from kdlib.teachers import train_ensemble
from kdlib.trainees import BRANCHED, saved_hparams

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
FINAL_CHECKPOINT = "final_checkpoint.json"  # a distill stage's last Ray Train checkpoint, named below ray_train/


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...]")
    return config_and_overrides(p.parse_args(argv).args, DEFAULT_CONFIG)


def train_teachers(cfg: RunConfig, tasks: dict[str, TaskData], enc: dict, cache: StageCache) -> dict[str, str]:
    """One Ray task per task trains its K-member ensemble; tasks run concurrently. Returns artifact dirs."""
    remote = ray.remote(num_cpus=cfg.teachers.cpus_per_task)(train_ensemble_on_node)
    t = cfg.teachers
    dirs, pending, started = {}, {}, time.perf_counter()
    for name, data in tasks.items():
        if not cfg.tasks[name].teacher:
            print(f"[teachers:{name}] none (teacher: false): the student learns it from gold labels")
            continue
        fp = fingerprint("teachers", enc["fingerprint"], data.digest, cfg.tasks[name].fine_tune_layers,
                         t.model_dump(exclude={"cpus_per_task"}), cfg.encoder.pooling, cfg.encoder.max_length,
                         cfg.seed)
        out, done = cache.begin("teachers", fp)
        dirs[name] = storage.child(out, "ensemble")
        if done:
            print(f"[teachers:{name}] inputs unchanged, reusing {out}")
            cache.reuse("teachers", fp)
            continue
        pending[name] = (fp, remote.remote(
            task=name, kind=data.kind, label_names=data.label_names, metric=data.metric,
            train=data.train, encoder_source=enc["source"], random_init=cfg.encoder.random_init,
            config_overrides=cfg.encoder.config_overrides, pooling=cfg.encoder.pooling,
            max_length=cfg.encoder.max_length, fine_tune_layers=cfg.tasks[name].fine_tune_layers,
            members=t.members, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, head_lr=t.head_lr,
            weight_decay=t.weight_decay, seed=cfg.seed, location=out))
    for name, (fp, ref) in pending.items():
        info = ray.get(ref)
        cache.finish("teachers", fp, time.perf_counter() - started, info)
        print(f"[teachers:{name}] trained in {info['seconds']}s")
    return dirs


def train_ensemble_on_node(location: str, **kwargs) -> dict:
    """kdlib.teachers.train_ensemble into `<location>/ensemble` (uploaded from this node when the storage root
    is remote), reporting the node it ran on."""
    with storage.staged_dir(location) as out:
        info = train_ensemble(out_dir=str(out / "ensemble"), **kwargs)
    return {**info, "where": ray.util.get_node_ip_address()}


def placement(nodes: list[str], unit: str) -> str:
    """'192.0.2.7 (2 train workers)' from one node address per worker, shard or task."""
    counts = Counter(n for n in nodes if n)
    return ", ".join(f"{n} ({c} {unit}{'s' if c > 1 else ''})" for n, c in sorted(counts.items()))


def plan_labels(cfg: RunConfig, tasks: dict[str, TaskData], teacher_dirs: dict[str, str], enc: dict):
    """Per task: the examples to label (dev, train, masked copies, unlabeled text), their content-addressed
    store and its shard plan. Returns (stores, plan)."""
    mask_token = load_tokenizer(enc["source"]).mask_token
    stores, plan = {}, []
    for name, data in tasks.items():
        t = cfg.tasks[name]
        if not t.teacher:
            continue
        parts = [data.dev, data.train,
                 masked_copies(data.train, copies=t.augment.copies, p=t.augment.mask_prob, seed=cfg.seed,
                               mask_token=mask_token)]
        unlabeled = None
        if t.unlabeled is not None:
            path = cfg.task_path(name, "unlabeled")
            parts.append(read_unlabeled(path, task=name, has_pair=t.text_pair_column is not None))
            unlabeled = file_digest(path)
        examples = pd.concat([p for p in parts if len(p)], ignore_index=True)
        key = fingerprint("soft-targets", storage.name(storage.parent(teacher_dirs[name])), data.digest,
                          t.augment.model_dump(), unlabeled, cfg.seed, cfg.encoder.max_length, cfg.labeling.shard_size)
        stores[name] = SoftTargetStore(cfg.storage_root, name, key)
        plan += plan_shards(name, examples, cfg.labeling.shard_size)
        counts = examples["source"].value_counts().to_dict()
        print(f"[labels:{name}] {len(examples)} examples to label {counts} -> {stores[name].location}")
    return stores, plan


def labeling_settings(cfg: RunConfig, teacher_dirs: dict[str, str], enc: dict) -> dict:
    lab = cfg.labeling
    return dict(ensembles=teacher_dirs, encoder_source=enc["source"], random_init=cfg.encoder.random_init,
                config_overrides=cfg.encoder.config_overrides, seed=cfg.seed, max_length=cfg.encoder.max_length,
                num_actors=lab.num_actors, cpus_per_actor=lab.cpus_per_actor, torch_threads=lab.torch_threads,
                batch_size=lab.batch_size)


def label_tasks(cfg: RunConfig, stores: dict[str, SoftTargetStore], plan, teacher_dirs: dict[str, str], enc: dict,
                cache: StageCache, splits=("dev", "train")) -> None:
    """Fill the soft-target stores: label every planned shard of `splits` that is not committed yet.

    Complete stores (a manifest written by any earlier run with the same inputs) are reused as they are;
    shards whose examples another version labeled with the same teachers are copied from it (carry_over).
    """
    todo = {name for name, store in stores.items() if not store.is_complete()}
    for name in stores.keys() - todo:
        _record(cache, stores[name], cached=True, seconds=0.0)
    if not todo:
        return
    for name in sorted(todo):  # what another version of the store labeled with these teachers is copied
        carried = carry_over(stores[name], plan, teachers=storage.name(storage.parent(teacher_dirs[name])),
                             max_length=cfg.encoder.max_length)
        if carried["shards"]:
            print(f"[labels:{name}] {carried['rows']} examples ({carried['shards']} shards) carried over from "
                  f"{', '.join(carried['from'])}: same teachers, not labeled again")
    stats = run_labeling([(s, ex) for s, ex in plan if s.split in splits and s.task in todo], stores=stores,
                         progress_seconds=cfg.labeling.progress_seconds, **labeling_settings(cfg, teacher_dirs, enc))
    if set(splits) == {"dev", "train"}:
        finish_labels(cfg, stores, plan, teacher_dirs, cache, stats["seconds"])


def _record(cache: StageCache, store: SoftTargetStore, *, cached: bool, seconds: float) -> None:
    if not any(r.name == "labels" and r.fingerprint == store.key for r in cache.records):
        if cached:
            print(f"[labels:{store.task}] inputs unchanged, reusing {store.location}")
        where = "reused" if cached else placement([r.get("node") for r in store.commit_records()], "shard")
        cache.record("labels", store.key, store.location, cached=cached, seconds=seconds, where=where)


def finish_labels(cfg: RunConfig, stores: dict[str, SoftTargetStore], plan, teacher_dirs: dict[str, str],
                  cache: StageCache, seconds: float) -> None:
    """Verify every shard of every store and write the manifests that make the stores readable."""
    for name, store in stores.items():
        if store.is_complete():
            continue
        t = cfg.tasks[name]
        manifest = store.finalize([s for s, _ in plan if s.task == name], {
            "teachers": {"dir": teacher_dirs[name], "fingerprint": storage.name(storage.parent(teacher_dirs[name])),
                         "members": cfg.teachers.members},
            "augment": t.augment.model_dump(), "unlabeled": t.unlabeled, "max_length": cfg.encoder.max_length})
        _record(cache, store, cached=False, seconds=seconds)
        print(f"[labels:{name}] {manifest['rows']} examples in the store {manifest['rows_by_split']}")


def distill_students(cfg: RunConfig, tasks: dict[str, TaskData], teacher_dirs: dict[str, str],
                     stores: dict[str, SoftTargetStore], plan, enc: dict, cache: StageCache) -> str:
    """Ray Train distils all tasks' students together; each task's student is saved as its own artifact.

    The training rows come from the soft-target stores, or with `labeling.stream` straight from the
    labeling actors while they label (and commit) the training shards.
    """
    d = cfg.distill
    task_cfg = {name: student_task(cfg, data, stores.get(name), plan, teacher_dirs.get(name))
                for name, data in tasks.items()}
    loop_config = {"tasks": task_cfg, "encoder_source": enc["source"], "random_init": cfg.encoder.random_init,
                   "config_overrides": cfg.encoder.config_overrides, "pooling": cfg.encoder.pooling,
                   "max_length": cfg.encoder.max_length, "seed": cfg.seed, "log_every": 20,
                   "student": {"kind": cfg.student.kind, "hparams": cfg.student.hparams()},
                   "per_task": d.per_task_students,
                   **d.model_dump(include={"epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "temperature", "alpha",
                                           "torch_threads", "teacher_annealing", "schedule", "sampling_tau",
                                           "road_k"})}
    gold_only = {n: tasks[n] for n in tasks if n not in stores}
    fp = fingerprint("students", {n: s.key for n, s in stores.items()}, {n: t.digest for n, t in gold_only.items()},
                     {k: v for k, v in loop_config.items() if k != "tasks"},
                     {t: {k: v for k, v in c.items() if k != "ensemble_dir"} for t, c in task_cfg.items()})

    ray_train = storage.child(cache.location("distill", fp), "ray_train")  # checkpoints: straight to storage

    def run(out: Path) -> dict:
        streaming = cfg.labeling.stream and not all(s.is_complete() for s in stores.values())
        if streaming:
            check_stream_fits(cfg)
            train_plan = [(s, ex) for s, ex in plan if s.split == "train"]
            print(f"[distill] streaming {sum(s.rows for s, _ in train_plan)} training rows from the labeling "
                  f"actors into Ray Train (committed shards are read back, not relabeled)")
            datasets = {"stream": labeling_dataset(train_plan, stores=stores, emit_rows=True,
                                                   **labeling_settings(cfg, teacher_dirs, enc)),
                        **gold_only_datasets(gold_only)}
            progress = ProgressReporter(stores, total=sum(s.rows for s, _ in pending(train_plan, stores)),
                                        every=cfg.labeling.progress_seconds)
        else:
            datasets = training_datasets(stores, gold_only)
            progress = contextlib.nullcontext()
        started = time.perf_counter()
        with progress:
            result = run_distillation(datasets=datasets, loop_config=loop_config, num_workers=d.num_workers,
                                      cpus_per_worker=d.cpus_per_worker, max_failures=d.max_failures,
                                      storage_path=ray_train, name="distill")
        if streaming:
            finish_labels(cfg, stores, plan, teacher_dirs, cache, time.perf_counter() - started)
        (out / "loop_config.json").write_text(json.dumps(loop_config, indent=1))  # what the workers trained with
        # Where the final weights are, for a fine-tuning stage that starts from them in this run or a later one.
        (out / FINAL_CHECKPOINT).write_text(json.dumps({"checkpoint": checkpoint_name(result.checkpoint)}))
        return save_training(cfg, tasks, loop_config, result, out, enc)

    distilled = cache.run("distill", fp, run)
    if not d.fine_tune_epochs:
        return storage.child(distilled, "students")
    return fine_tune(cfg, tasks, lambda: training_datasets(stores, gold_only), loop_config, distilled, enc, cache)


def student_task(cfg: RunConfig, data: TaskData, store: SoftTargetStore | None, plan, teacher_dir: str | None) -> dict:
    """What the training loop needs to know about one task: its head, branch, loss and teacher."""
    t = cfg.tasks[data.name]
    task = {"kind": data.kind, "pair": t.text_pair_column is not None, "bins": t.bins,
            "num_outputs": data.num_outputs if t.bins is None else ScoreBins(*t.bins).num_bins,
            "branch_layers": t.branch_layers, "fine_tune_layers": t.fine_tune_layers,
            "aggregation": t.resolved_aggregation, "wrong_teacher_weight": t.wrong_teacher_weight}
    if store is None:  # no teacher: gold labels only, the branch from the encoder's own layers
        return {**task, "ensemble_dir": None, "init_member": None, "objective": "hard"}
    # The student branch starts from the ensemble member with the best dev score.
    dev = (store.read(split="dev") if store.is_complete()
           else store.read_committed([sh for sh, _ in plan if sh.task == data.name and sh.split == "dev"]))
    members = member_scores(data.kind, data.metric, dev["label"].to_numpy(), teacher_logits_array(dev))
    best = max(range(len(members)), key=members.__getitem__)
    return {**task, "ensemble_dir": teacher_dir, "init_member": member_name(data.name, best),
            "objective": t.objective or cfg.distill.objective}


def training_datasets(stores: dict[str, SoftTargetStore], gold_only: dict[str, TaskData]) -> dict:
    """One Ray Dataset per task: its store's training rows, or its gold-labeled rows if it has no teacher."""
    return {**{name: store.dataset(split="train") for name, store in stores.items()}, **gold_only_datasets(gold_only)}


def gold_only_datasets(gold_only: dict[str, TaskData]) -> dict:
    return {name: gold_only_dataset(name, data.train) for name, data in gold_only.items()}


def checkpoint_name(checkpoint: Checkpoint) -> str:
    """A Ray Train checkpoint's place below its stage's `ray_train` folder: `<run name>/<checkpoint dir>`."""
    return "/".join(PurePosixPath(checkpoint.path).parts[-2:])


def fine_tune(cfg: RunConfig, tasks: dict[str, TaskData], datasets, loop_config: dict, distilled: str,
              enc: dict, cache: StageCache) -> str:
    """MKD sec. 6.2: every task's student trained further on that task alone, from the multi-task weights.

    Its own stage, keyed by the distillation it starts from and its own settings: trying other fine-tuning
    settings reuses the (much longer) multi-task distillation. One Ray Train run (same loss, workers and
    fault tolerance) in which each step trains one task's own student: its branch (branched), or its own
    copy of the end-to-end student. `datasets()` gives its training datasets (built only if it runs).
    Returns the students' folder."""
    d = cfg.distill
    fp = fingerprint("fine_tune", storage.name(distilled), d.fine_tune_epochs, d.fine_tune_lr)
    ray_train = storage.child(cache.location("fine_tune", fp), "ray_train")

    def run(out: Path) -> dict:
        name = json.loads(storage.read_text_at(storage.child(distilled, FINAL_CHECKPOINT)))["checkpoint"]
        fs, path = storage.filesystem(storage.child(distilled, "ray_train", *name.split("/")))
        multitask = Checkpoint(path, filesystem=fs)
        print(f"[fine-tune] {d.fine_tune_epochs} epochs per task at lr {d.fine_tune_lr:g} from the multi-task "
              f"student ({storage.name(distilled)})")
        config = {**loop_config, "epochs": d.fine_tune_epochs, "lr": d.fine_tune_lr, "schedule": "mtdnn",
                  "per_task": True, "init_weights": multitask}
        result = run_distillation(datasets=datasets(), loop_config=config, num_workers=d.num_workers,
                                  cpus_per_worker=d.cpus_per_worker, max_failures=d.max_failures,
                                  storage_path=ray_train, name="fine_tune")
        return save_training(cfg, tasks, config, result, out, enc)

    return storage.child(cache.run("fine_tune", fp, run), "students")


def save_training(cfg: RunConfig, tasks: dict[str, TaskData], loop_config: dict, result, out: Path,
                  enc: dict) -> dict:
    """A finished Ray Train run into its stage folder `out`: its report and its students; the stage's facts."""
    write_train_report(result, out / "train_report.json")
    save_students(cfg, tasks, loop_config, result.checkpoint, out / "students", enc)
    return {"where": placement(result.metrics["placement/nodes"], "train worker")}


def write_train_report(result, path: Path) -> None:
    """What the workers trained on (rows, duplicates, ids digest per task), whether their replicas ended
    identical, how long the last epoch took, its last step and that step's learning rate, from the last epoch's
    metrics (tests and benchmarks read it)."""
    path.write_text(json.dumps({k: v for k, v in result.metrics.items()
                                if k.split("/")[0] in ("rows", "duplicates", "ids", "replicas", "placement", "epoch",
                                                       "step", "lr", "seconds")}))


def save_students(cfg: RunConfig, tasks: dict[str, TaskData], loop_config: dict, checkpoint, folder: Path,
                  enc: dict) -> None:
    """The trained student(s) as artifacts under `folder`.

    branched: one trunk-less artifact per task (`<task>/`), merged by the next stage. End-to-end students:
    `multitask/` (one model, every task's head), or after per-task fine-tuning one copy per task (`<task>/`)."""
    facts = {n: {"kind": t.kind, "label_names": t.label_names, "metric": t.metric} for n, t in tasks.items()}
    model = load_trained_student(checkpoint, loop_config)
    if cfg.student.kind == BRANCHED:
        for name in tasks:
            save_model(single_task(model, name), folder / name, include_trunk=False, tasks={name: facts[name]},
                       extra={"role": "student", "encoder": enc})
        return
    extra = {"role": "student", "encoder": enc, "max_length": cfg.encoder.max_length,
             "config": cfg.model_dump(mode="json")}
    students = ({n: (model[n], [n]) for n in tasks} if loop_config.get("per_task")
                else {"multitask": (model, list(tasks))})
    for key, (student, names) in students.items():
        save_student(student, folder / key, name=cfg.student.kind, hparams=saved_hparams(loop_config, student),
                     tasks={n: facts[n] for n in names}, extra=extra)


def student_dirs(students_dir: str, names) -> dict[str, Path]:
    """Each task's end-to-end student artifact (on this node's disk): its fine-tuned copy, else the multi-task model."""
    root = storage.local_copy(students_dir)
    return {n: root / n if (root / n).exists() else root / "multitask" for n in names}


def check_stream_fits(cfg: RunConfig) -> None:
    """Streaming runs the labeling actors and the train workers at once: their CPUs must fit together."""
    lab, d = cfg.labeling, cfg.distill
    need = lab.num_actors * lab.cpus_per_actor + d.num_workers * d.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"labeling.stream=true runs {lab.num_actors} labeling actors x {lab.cpus_per_actor} CPU "
                          f"and {d.num_workers} train workers x {d.cpus_per_worker} CPU at once ({need:g} CPUs) but "
                          f"the cluster has {have:g}; lower labeling.cpus_per_actor / distill.cpus_per_worker")


def merge_students(cfg: RunConfig, tasks: dict[str, TaskData], students_dir: str, enc: dict,
                   cache: StageCache) -> str:
    """One artifact: the encoder's trunk up to the deepest branch point, every task's branch at its depth."""
    fp = fingerprint("merge", storage.name(storage.parent(students_dir)))

    def run(out: Path) -> None:
        encoder = load_encoder(enc["source"], cfg.encoder.random_init, cfg.encoder.config_overrides, seed=cfg.seed)
        students = [load_model(storage.local_copy(students_dir) / name, encoder=encoder)[0] for name in tasks]
        merged = merge(encoder, students, cfg.encoder.pooling)
        save_model(merged, out / "model", tasks={n: {"kind": t.kind, "label_names": t.label_names,
                                                     "metric": t.metric} for n, t in tasks.items()},
                   extra={"role": "merged", "encoder": enc, "max_length": cfg.encoder.max_length,
                          "config": cfg.model_dump(mode="json")})
        return {"where": f"driver ({ray.util.get_node_ip_address()})"}

    return storage.child(cache.run("merge", fp, run), "model")


def evaluate(cfg: RunConfig, tasks: dict[str, TaskData], stores: dict[str, SoftTargetStore], model_dir: str,
             enc: dict) -> dict:
    """Dev scores of each teacher member, the ensemble and the student; the merged model's overhead, or an
    end-to-end student's parameter count."""
    tokenizer = load_tokenizer(enc["source"])
    branched = cfg.student.kind == BRANCHED
    if branched:
        model, manifest = load_model(storage.local_copy(model_dir))
        models = {name: model for name in tasks}
    else:
        models = {name: load_student(path)[0] for name, path in student_dirs(model_dir, tasks).items()}
    run = predict if branched else predict_student
    scores = {}
    for name, data in tasks.items():
        # A task without a teacher has no store: its dev rows and no teacher logits.
        dev = stores[name].read(split="dev") if name in stores else data.dev.assign(teacher_logits=[[]] * len(data.dev))
        outputs = run(models[name], tokenizer, dev["text"].tolist(), dev["text_pair"].tolist(), [name],
                      max_length=cfg.encoder.max_length)[name]
        scores[name] = score_task(kind=data.kind, metric=data.metric, labels=dev["label"].to_numpy(),
                                  teacher_logits=teacher_logits_array(dev), student_outputs=outputs,
                                  ensemble=cfg.tasks[name].resolved_aggregation, temperature=cfg.distill.temperature)
    if not branched:
        some = next(iter(models.values()))
        return {"scores": scores, "overhead": None, "student": cfg.student.kind,
                "parameters": {"total": count_parameters(some),
                               "without_embeddings": count_parameters(some, include_embeddings=False)}}
    n_layers = manifest["encoder_config"]["num_hidden_layers"]
    layout = [(b["depth"], b["layers"]) for b in manifest["branches"]]
    return {"scores": scores, "overhead": overhead(layout, n_layers), "student": BRANCHED,
            "layers": {"trunk": manifest["trunk_depth"], "branches": {b["name"]: b["layers"] for b in manifest["branches"]},
                       "encoder": n_layers}}


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_run_config(config_path, overrides)
        started = time.perf_counter()
        run_dir = storage.child(cfg.storage_root, cfg.run_name)
        dump_config(cfg, storage.child(run_dir, "config.yaml"))
        print(f"[run] {cfg.run_name}: config {config_path} -> {run_dir}")

        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
        enc = {"name": cfg.encoder.name, "source": source,
               "fingerprint": encoder_fingerprint(source, cfg.encoder.random_init, cfg.encoder.config_overrides, cfg.seed)}
        cache = StageCache(cfg.storage_root)

        tasks = load_tasks(cfg)
        for name, t in tasks.items():
            print(f"[data:{name}] {t.kind}, {len(t.train)} train / {len(t.dev)} dev, labels {t.label_names or '-'}")
        teacher_dirs = train_teachers(cfg, tasks, enc, cache)
        stores, plan = plan_labels(cfg, tasks, teacher_dirs, enc)
        # Streaming: only dev is labeled up front (it picks each student's initial member); the training
        # shards are labeled while Ray Train consumes them.
        label_tasks(cfg, stores, plan, teacher_dirs, enc, cache, splits=("dev",) if cfg.labeling.stream else ("dev", "train"))
        students_dir = distill_students(cfg, tasks, teacher_dirs, stores, plan, enc, cache)
        if cfg.labeling.stream:  # what streaming left (nothing, unless the distill stage was cached): label, seal
            label_tasks(cfg, stores, plan, teacher_dirs, enc, cache)
        # The branched students merge onto one trunk; an end-to-end student is one model already.
        model_dir = merge_students(cfg, tasks, students_dir, enc, cache) if cfg.student.kind == BRANCHED else students_dir
        results = evaluate(cfg, tasks, stores, model_dir, enc)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results.update(run_name=cfg.run_name, model_dir=model_dir, seconds=round(time.perf_counter() - started, 1),
                   stages=[vars(r) for r in cache.records])
    headers, rows = summary_rows(results["scores"], results["overhead"])
    table = markdown_table(headers, rows)
    storage.write_text_at(storage.child(run_dir, "results.json"), json.dumps(results, indent=2))
    storage.write_text_at(storage.child(run_dir, "results.md"), f"# {cfg.run_name}\n\n{table}\n\nmodel: `{model_dir}`"
                                                               f"\n\n## Stages\n\n{cache.table()}\n")
    print(f"\n{cache.table()}")
    print(f"\n{table}\n\n{'merged model' if cfg.student.kind == BRANCHED else cfg.student.kind + ' student'}: {model_dir}\nresults: {run_dir}/results.json, results.md "
          f"({results['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
