"""Distil per-task teacher ensembles into one merged multi-task student, end to end on Ray.

Standalone (starts an embedded local Ray; the demo config by default):
    python jobs/distill.py
    python jobs/distill.py configs/glue_mini.yaml data_dir=../shared/data/glue-mini
On a running cluster (`ray start --head`, then):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py storage_root=$PWD/runs

Stages, each cached under <storage_root>/cache/<stage>/<fingerprint> so unchanged inputs are reused:
  data -> teachers (Ray tasks) -> labels (Ray Data actor pool) -> distill (Ray Train)
  -> merge (one safetensors artifact) -> evaluate (table in <storage_root>/<run_name>/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import ray

from kdlib.artifact import load_model, save_model
from kdlib.branched import member_name
from kdlib.cluster import init_ray
from kdlib.config import RunConfig, load_run_config
from kdlib.config_loading import dump_config
from kdlib.distill import load_trained_student, run_distillation, soft_target_dataset
from kdlib.encoder import encoder_fingerprint, load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.errors import KdlibError
from kdlib.evaluate import markdown_table, member_scores, score_task, summary_rows
from kdlib.labeling import label_examples, read_labels, teacher_logits_array
from kdlib.merge import merge, overhead, single_task
from kdlib.predict import predict
from kdlib.stages import StageCache, fingerprint
from kdlib.tasks import TaskData, load_task
from kdlib.teachers import train_ensemble

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...]")
    args = p.parse_args(argv).args
    config = args[0] if args and "=" not in args[0] else str(DEFAULT_CONFIG)
    return config, [a for a in args if "=" in a]


def load_tasks(cfg: RunConfig) -> dict[str, TaskData]:
    return {name: load_task(name=name, kind=t.kind, format=t.format, train_path=cfg.task_path(name, "train"),
                            dev_path=cfg.task_path(name, "dev"), text_column=t.text_column,
                            text_pair_column=t.text_pair_column, label_column=t.label_column, labels=t.labels,
                            metric=t.metric, hub_config=t.hub_config, max_train_examples=t.max_train_examples)
            for name, t in cfg.tasks.items()}


def train_teachers(cfg: RunConfig, tasks: dict[str, TaskData], enc: dict, cache: StageCache) -> dict[str, str]:
    """One Ray task per task trains its K-member ensemble; tasks run concurrently. Returns artifact dirs."""
    remote = ray.remote(num_cpus=cfg.teachers.cpus_per_task)(train_ensemble)
    t = cfg.teachers
    dirs, pending, started = {}, {}, time.perf_counter()
    for name, data in tasks.items():
        fp = fingerprint("teachers", enc["fingerprint"], data.digest, cfg.tasks[name].fine_tune_layers,
                         t.model_dump(exclude={"cpus_per_task"}), cfg.encoder.pooling, cfg.encoder.max_length,
                         cfg.seed)
        out, done = cache.begin("teachers", fp)
        dirs[name] = str(out / "ensemble")
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
            weight_decay=t.weight_decay, seed=cfg.seed, out_dir=dirs[name]))
    for name, (fp, ref) in pending.items():
        info = ray.get(ref)
        cache.finish("teachers", fp, time.perf_counter() - started, info)
        print(f"[teachers:{name}] trained in {info['seconds']}s")
    return dirs


def label_tasks(cfg: RunConfig, tasks: dict[str, TaskData], teacher_dirs: dict[str, str], enc: dict,
                cache: StageCache) -> dict[str, str]:
    """Every train and dev example of every task gets all its teachers' logits (Parquet)."""
    lab = cfg.labeling
    dirs = {}
    for name, data in tasks.items():
        fp = fingerprint("labels", Path(teacher_dirs[name]).parent.name, data.digest, cfg.encoder.max_length)

        def run(out: Path, name=name, data=data) -> None:
            n = label_examples(pd.concat([data.train, data.dev], ignore_index=True),
                               ensemble_dir=teacher_dirs[name], out_dir=str(out / "parquet"),
                               encoder_source=enc["source"], random_init=cfg.encoder.random_init,
                               config_overrides=cfg.encoder.config_overrides, seed=cfg.seed,
                               max_length=cfg.encoder.max_length, num_actors=lab.num_actors,
                               cpus_per_actor=lab.cpus_per_actor, torch_threads=lab.torch_threads,
                               batch_size=lab.batch_size)
            print(f"[labels:{name}] {n} examples labeled by {cfg.teachers.members} teachers")

        dirs[name] = str(cache.run("labels", fp, run) / "parquet")
    return dirs


def distill_students(cfg: RunConfig, tasks: dict[str, TaskData], teacher_dirs: dict[str, str],
                     label_dirs: dict[str, str], enc: dict, cache: StageCache) -> str:
    """Ray Train distils all tasks' students together; each task's student is saved as its own artifact."""
    d = cfg.distill
    tokenizer = load_tokenizer(enc["source"])
    task_cfg = {}
    for name, data in tasks.items():
        # The student branch starts from the ensemble member with the best dev score.
        dev = read_labels(label_dirs[name], split="dev")
        members = member_scores(data.kind, data.metric, dev["label"].to_numpy(), teacher_logits_array(dev))
        best = max(range(len(members)), key=members.__getitem__)
        task_cfg[name] = {"kind": data.kind, "ensemble_dir": teacher_dirs[name], "init_member": member_name(name, best),
                          "branch_layers": cfg.tasks[name].branch_layers}
    loop_config = {"tasks": task_cfg, "encoder_source": enc["source"], "random_init": cfg.encoder.random_init,
                   "config_overrides": cfg.encoder.config_overrides, "pooling": cfg.encoder.pooling,
                   "seed": cfg.seed, "log_every": 20, **d.model_dump(include={
                       "epochs", "batch_size", "lr", "weight_decay", "temperature", "alpha", "ensemble",
                       "torch_threads"})}
    fp = fingerprint("students", [Path(p).parent.name for p in label_dirs.values()],
                     {k: v for k, v in loop_config.items() if k != "tasks"},
                     {t: {k: v for k, v in c.items() if k != "ensemble_dir"} for t, c in task_cfg.items()})

    def run(out: Path) -> None:
        datasets = {name: soft_target_dataset(read_labels(label_dirs[name], split="train"), tokenizer,
                                              kind=tasks[name].kind, max_length=cfg.encoder.max_length)
                    for name in tasks}
        result = run_distillation(datasets=datasets, loop_config=loop_config, num_workers=d.num_workers,
                                  cpus_per_worker=d.cpus_per_worker, max_failures=d.max_failures,
                                  storage_path=str(out / "ray_train"), name="distill")
        student, _ = load_trained_student(result.checkpoint, loop_config)
        for name, data in tasks.items():
            save_model(single_task(student, name), out / "students" / name, include_trunk=False,
                       tasks={name: {"kind": data.kind, "label_names": data.label_names, "metric": data.metric}},
                       extra={"role": "student", "encoder": enc})

    return str(cache.run("distill", fp, run) / "students")


def merge_students(cfg: RunConfig, tasks: dict[str, TaskData], students_dir: str, enc: dict,
                   cache: StageCache) -> str:
    """One artifact: the encoder's trunk up to the deepest branch point, every task's branch at its depth."""
    fp = fingerprint("merge", Path(students_dir).parent.name)

    def run(out: Path) -> None:
        encoder = load_encoder(enc["source"], cfg.encoder.random_init, cfg.encoder.config_overrides, seed=cfg.seed)
        students = [load_model(Path(students_dir) / name, encoder=encoder)[0] for name in tasks]
        merged = merge(encoder, students, cfg.encoder.pooling)
        save_model(merged, out / "model", tasks={n: {"kind": t.kind, "label_names": t.label_names,
                                                     "metric": t.metric} for n, t in tasks.items()},
                   extra={"role": "merged", "encoder": enc, "max_length": cfg.encoder.max_length,
                          "config": cfg.model_dump(mode="json")})

    return str(cache.run("merge", fp, run) / "model")


def evaluate(cfg: RunConfig, tasks: dict[str, TaskData], label_dirs: dict[str, str], model_dir: str,
             enc: dict) -> dict:
    """Dev scores of each teacher member, the ensemble and the merged student, plus the overhead."""
    model, manifest = load_model(model_dir)
    tokenizer = load_tokenizer(enc["source"])
    scores = {}
    for name, data in tasks.items():
        dev = read_labels(label_dirs[name], split="dev")
        pairs = dev["text_pair"].tolist()
        outputs = predict(model, tokenizer, dev["text"].tolist(), None if pairs[0] is None else pairs, [name],
                          max_length=cfg.encoder.max_length)[name]
        scores[name] = score_task(kind=data.kind, metric=data.metric, labels=dev["label"].to_numpy(),
                                  teacher_logits=teacher_logits_array(dev), student_outputs=outputs,
                                  ensemble=cfg.distill.ensemble, temperature=cfg.distill.temperature)
    n_layers = manifest["encoder_config"]["num_hidden_layers"]
    layout = [(b["depth"], b["layers"]) for b in manifest["branches"]]
    return {"scores": scores, "overhead": overhead(layout, n_layers),
            "layers": {"trunk": manifest["trunk_depth"], "branches": {b["name"]: b["layers"] for b in manifest["branches"]},
                       "encoder": n_layers}}


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_run_config(config_path, overrides)
        started = time.perf_counter()
        root = Path(cfg.storage_root).expanduser().resolve()
        run_dir = root / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        print(f"[run] {cfg.run_name}: config {config_path} -> {run_dir}")

        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
        enc = {"name": cfg.encoder.name, "source": source,
               "fingerprint": encoder_fingerprint(source, cfg.encoder.random_init, cfg.encoder.config_overrides, cfg.seed)}
        cache = StageCache(root)

        tasks = load_tasks(cfg)
        for name, t in tasks.items():
            print(f"[data:{name}] {t.kind}, {len(t.train)} train / {len(t.dev)} dev, labels {t.label_names or '-'}")
        teacher_dirs = train_teachers(cfg, tasks, enc, cache)
        label_dirs = label_tasks(cfg, tasks, teacher_dirs, enc, cache)
        students_dir = distill_students(cfg, tasks, teacher_dirs, label_dirs, enc, cache)
        model_dir = merge_students(cfg, tasks, students_dir, enc, cache)
        results = evaluate(cfg, tasks, label_dirs, model_dir, enc)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results.update(run_name=cfg.run_name, model_dir=model_dir, seconds=round(time.perf_counter() - started, 1),
                   stages=[vars(r) for r in cache.records])
    headers, rows = summary_rows(results["scores"], results["overhead"])
    table = markdown_table(headers, rows)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text(f"# {cfg.run_name}\n\n{table}\n\nmodel: `{model_dir}`\n")
    print(f"\n{table}\n\nmerged model: {model_dir}\nresults: {run_dir}/results.json, results.md "
          f"({results['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
