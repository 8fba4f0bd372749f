"""The evaluate stage: dev scores of each teacher member, the ensemble and the student, and each task's
sanity baseline (a teacher ensemble at chance level is a warning); the merged model's overhead, or an
end-to-end student's parameter count; `results.json`, `results.md` and the training curves (`curves.png`,
`tensorboard/`) in the run folder."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlib import storage
from kdlib.artifact import load_model
from kdlib.baselines import MARGIN, at_chance, task_baseline, teacher_warning
from kdlib.curves import plot_curves, write_events
from kdlib.merge import overhead
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.distill import HISTORY
from kdlib.pipeline.labels import Labels
from kdlib.predict import predict, predict_student
from kdlib.scoring import markdown_table, score_task, summary_rows
from kdlib.soft_targets import teacher_logits_array
from kdlib.students.artifact import load_student
from kdlib.students.registry import count_parameters
from kdlib.teachers import HISTORY as TEACHER_HISTORY
from kdlib.trainees import BRANCHED

CURVES_PNG = "curves.png"  # in the run folder: loss and dev score by epoch per task
TENSORBOARD = "tensorboard"  # in the run folder: one TensorBoard run per training stage (kdlib.curves)


@dataclass
class Results:
    """What results.json holds: per-task scores (kdlib.scoring.score_task) and baselines (kdlib.baselines),
    the sanity warnings, the student, and its cost."""

    scores: dict[str, dict]
    student: str
    baselines: dict[str, dict] = field(default_factory=dict)  # per task: predictor, prediction, score
    warnings: list[str] = field(default_factory=list)  # teacher ensembles at chance level
    overhead: float | None = None  # merged branched model: extra layer passes over one encoder
    layers: dict | None = None  # merged branched model: trunk, branches, encoder depth
    parameters: dict | None = None  # end-to-end students: total and without embeddings
    run_name: str = ""
    model_dir: str = ""
    seconds: float = 0.0
    stages: list[dict] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(*summary_rows(self.scores, self.overhead, self.baselines))


def student_dirs(students_dir: str, names) -> dict[str, Path]:
    """Each task's end-to-end student artifact (on this node's disk): its fine-tuned copy, else the multi-task model."""
    root = storage.local_copy(students_dir)
    return {n: root / n if (root / n).exists() else root / "multitask" for n in names}


def evaluate(ctx, tasks: dict[str, TaskData], labels: Labels, model_dir: str) -> Results:
    """Score the run's model (the merged artifact, or the end-to-end students' folder) on every dev set."""
    cfg = ctx.cfg
    tokenizer = ctx.encoder.tokenizer()
    branched = cfg.student.kind == BRANCHED
    if branched:
        model, manifest = load_model(storage.local_copy(model_dir))
        models = {name: model for name in tasks}
    else:
        models = {name: load_student(path)[0] for name, path in student_dirs(model_dir, tasks).items()}
    run = predict if branched else predict_student
    scores, baselines = {}, {}
    for name, data in tasks.items():
        # A task without a teacher has no store: its dev rows and no teacher logits.
        dev = (labels.stores[name].read(split="dev") if name in labels.stores
               else data.dev.assign(teacher_logits=[[]] * len(data.dev)))
        outputs = run(models[name], tokenizer, dev["text"].tolist(), dev["text_pair"].tolist(), [name],
                      max_length=ctx.encoder.max_length)[name]
        scores[name] = score_task(kind=data.kind, metric=data.metric, labels=dev["label"].to_numpy(),
                                  teacher_logits=teacher_logits_array(dev), student_outputs=outputs,
                                  ensemble=cfg.tasks[name].resolved_aggregation, temperature=cfg.distill.temperature)
        baselines[name] = task_baseline(kind=data.kind, metric=data.metric, train_labels=data.train["label"].to_numpy(),
                                        dev_labels=dev["label"].to_numpy(), num_classes=data.num_outputs)
    results = Results(scores=scores, student=cfg.student.kind, baselines=baselines,
                      warnings=chance_warnings(ctx, tasks, scores, baselines), run_name=cfg.run_name,
                      model_dir=model_dir)
    if not branched:
        some = next(iter(models.values()))
        results.parameters = {"total": count_parameters(some),
                              "without_embeddings": count_parameters(some, include_embeddings=False)}
        return results
    n_layers = manifest["encoder_config"]["num_hidden_layers"]
    results.overhead = overhead([(b["depth"], b["layers"]) for b in manifest["branches"]], n_layers)
    results.layers = {"trunk": manifest["trunk_depth"], "branches": {b["name"]: b["layers"] for b in manifest["branches"]},
                      "encoder": n_layers}
    return results


def chance_warnings(ctx, tasks: dict[str, TaskData], scores: dict[str, dict], baselines: dict[str, dict]) -> list[str]:
    """A warning (also logged) for every teacher ensemble within MARGIN points of its task's baseline."""
    cfg, warnings = ctx.cfg, []
    for name, s in scores.items():
        ensemble = s["primary"]["ensemble"]
        if ensemble is None or not at_chance(ensemble, baselines[name]["score"]):
            continue
        warnings.append(teacher_warning(task=name, metric=s["metric"], ensemble=ensemble, baseline=baselines[name],
                                        label_names=tasks[name].label_names, epochs=cfg.teachers.epochs,
                                        fine_tune_layers=cfg.tasks[name].fine_tune_layers,
                                        encoder_layers=ctx.encoder.num_layers(), lr=cfg.teachers.lr,
                                        checkpoints=cfg.tasks[name].teacher_checkpoints))
        ctx.log(f"[evaluate] WARNING {warnings[-1]}")
    return warnings


def write_results(ctx, results: Results) -> None:
    """results.json and results.md (the scores table, the warnings, the stages table) and the training curves
    into the run folder."""
    results.stages = [vars(r) for r in ctx.cache.records]
    data = {k: v for k, v in asdict(results).items() if v is not None or k == "overhead"}
    storage.write_text_at(storage.child(ctx.run_dir, "results.json"), json.dumps(data, indent=2))
    curves = write_curves(ctx, {name: s["metric"] for name, s in results.scores.items()},
                          {name: b["score"] for name, b in results.baselines.items()})
    warnings = "".join(f"- **WARNING** {w}\n" for w in results.warnings)
    storage.write_text_at(storage.child(ctx.run_dir, "results.md"),
                          f"# {results.run_name}\n\n{results.table()}\n\nbaseline: the majority class "
                          f"(classification) or the training mean (regression) for every dev example; a teacher "
                          f"ensemble within {MARGIN:g} points of it is at chance level.\n\n"
                          + (f"## Warnings\n\n{warnings}\n" if warnings else "")
                          + f"model: `{results.model_dir}`\n\n"
                          + (f"curves: `{CURVES_PNG}` (loss and dev score by epoch); TensorBoard: "
                             f"`tensorboard --logdir {storage.child(ctx.run_dir, TENSORBOARD)}`\n\n" if curves else "")
                          + f"## Stages\n\n{ctx.cache.table()}\n")


def stage_histories(records) -> dict[str, list[dict]]:
    """The per-epoch histories the run's training stages left (teachers per task, distill, fine_tune), by
    source ("teachers/<task>", "distill", "fine_tune"); a stage cached before histories were kept has none."""
    where = {"teachers": lambda r: storage.child(r.path, "ensemble", TEACHER_HISTORY),
             "distill": lambda r: storage.child(r.path, HISTORY), "fine_tune": lambda r: storage.child(r.path, HISTORY)}
    histories = {}
    for r in records:
        if r.name in where and storage.exists_at(location := where[r.name](r)):
            h = json.loads(storage.read_text_at(location))
            histories[h["stage"] + (f"/{h['task']}" if "task" in h else "")] = h["epochs"]
    return histories


def write_curves(ctx, metrics: dict[str, str], baselines: dict[str, float]) -> bool:
    """The run's training curves into its folder: TensorBoard event files (`tensorboard/<source>/`) and
    `curves.png` (`metrics`: task -> primary metric; `baselines`: task -> baseline score, drawn as a level).
    False when no stage left a history."""
    histories = stage_histories(ctx.cache.records)
    if not histories:
        return False
    tensorboard = storage.child(ctx.run_dir, TENSORBOARD)
    storage.delete_dir(tensorboard)  # a rerun replaces the curves (TensorBoard would show both sets of files)
    with storage.staged_dir(tensorboard) as folder:
        write_events(histories, folder)
    png = io.BytesIO()
    plot_curves(histories, metrics, png, baselines)
    storage.write_atomic(*storage.filesystem(storage.child(ctx.run_dir, CURVES_PNG)), png.getvalue())
    return True
