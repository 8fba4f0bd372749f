"""The evaluate stage: dev scores of each teacher member, the ensemble and the student; the merged model's
overhead, or an end-to-end student's parameter count; `results.json` and `results.md` in the run folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlib import storage
from kdlib.artifact import load_model
from kdlib.merge import overhead
from kdlib.pipeline.data import TaskData
from kdlib.pipeline.labels import Labels
from kdlib.predict import predict, predict_student
from kdlib.scoring import markdown_table, score_task, summary_rows
from kdlib.soft_targets import teacher_logits_array
from kdlib.students.artifact import load_student
from kdlib.students.registry import count_parameters
from kdlib.trainees import BRANCHED


@dataclass
class Results:
    """What results.json holds: per-task scores (kdlib.scoring.score_task), the student, and its cost."""

    scores: dict[str, dict]
    student: str
    overhead: float | None = None  # merged branched model: extra layer passes over one encoder
    layers: dict | None = None  # merged branched model: trunk, branches, encoder depth
    parameters: dict | None = None  # end-to-end students: total and without embeddings
    run_name: str = ""
    model_dir: str = ""
    seconds: float = 0.0
    stages: list[dict] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(*summary_rows(self.scores, self.overhead))


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
    scores = {}
    for name, data in tasks.items():
        # A task without a teacher has no store: its dev rows and no teacher logits.
        dev = (labels.stores[name].read(split="dev") if name in labels.stores
               else data.dev.assign(teacher_logits=[[]] * len(data.dev)))
        outputs = run(models[name], tokenizer, dev["text"].tolist(), dev["text_pair"].tolist(), [name],
                      max_length=ctx.encoder.max_length)[name]
        scores[name] = score_task(kind=data.kind, metric=data.metric, labels=dev["label"].to_numpy(),
                                  teacher_logits=teacher_logits_array(dev), student_outputs=outputs,
                                  ensemble=cfg.tasks[name].resolved_aggregation, temperature=cfg.distill.temperature)
    results = Results(scores=scores, student=cfg.student.kind, run_name=cfg.run_name, model_dir=model_dir)
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


def write_results(ctx, results: Results) -> None:
    """results.json and results.md (the scores table and the stages table) into the run folder."""
    results.stages = [vars(r) for r in ctx.cache.records]
    data = {k: v for k, v in asdict(results).items() if v is not None or k == "overhead"}
    storage.write_text_at(storage.child(ctx.run_dir, "results.json"), json.dumps(data, indent=2))
    storage.write_text_at(storage.child(ctx.run_dir, "results.md"),
                          f"# {results.run_name}\n\n{results.table()}\n\nmodel: `{results.model_dir}`"
                          f"\n\n## Stages\n\n{ctx.cache.table()}\n")
