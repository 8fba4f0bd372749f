"""`jobs/benchmark.py own_teachers`: the user's own teachers on real data, distilled by kdlib.

    python jobs/benchmark.py own_teachers --scale quick [--data-dir ../shared/data/glue-mini] [--storage-root runs]

In one run:
1. K = 2 SST-2 teachers fully fine-tuned outside kdlib, with plain transformers and PyTorch
   (jobs/finetune_teachers.py: all-MiniLM-L6-v2, every layer, seeds 0 and 1); reused when already there;
2. jobs/distill.py on configs/glue_mini_own_teachers.yaml (their checkpoints as `teacher_checkpoints`, labels
   mapped from LABEL_k) into the CMOW student and the branched student (one branch on the encoder's trunk);
   the soft targets are labeled once and reused by the second student;
3. dev accuracy of each student against the teachers' ensemble (retained %), and inference throughput on the
   SST-2 dev sentences at batch 128 (median of 3 timed passes each): the student against the teacher
   ensemble (both checkpoints, plain transformers) in the same process, one after the other.

No targets: the issue asks for the row (retained % and speed-up), not a threshold.
"""

from __future__ import annotations

import json
import runpy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.common import ROOT, distill_job, figure, grouped_bars, save_figure
from kdlib.artifact import load_model
from kdlib.predict import predict, predict_student
from kdlib.scoring import markdown_table
from kdlib.serve.model import student_folders
from kdlib.students.artifact import load_student

CONFIG = ROOT / "configs" / "glue_mini_own_teachers.yaml"
SCALES = {"quick": {"train_rows": 4000, "teacher_epochs": 2, "seeds": (0, 1)},
          "full": {"train_rows": None, "teacher_epochs": 2, "seeds": (0, 1)}}
STUDENTS = {"cmow": [], "branched": ["student.kind=branched", "student.cbow_init=random", "distill.lr=1e-4",
                                    "distill.epochs=3"]}
BATCH, REPEATS = 128, 3


def own_teachers_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    s = SCALES[scale]
    teachers = Path(storage_root).resolve() / f"own_teachers_{scale}"
    folders = [finetuned(teachers, data_dir, seed, s) for seed in s["seeds"]]
    rows = "null" if s["train_rows"] is None else s["train_rows"]
    common = [f"data_dir={data_dir}", f"storage_root={storage_root}", f"tasks.sst2.max_train_examples={rows}",
              f"tasks.sst2.teacher_checkpoints=[{', '.join(str(f) for f in folders)}]"]
    job = distill_job()
    dev = pd.read_csv(Path(data_dir) / "sst2" / "dev.tsv", sep="\t", quoting=3, keep_default_na=False)
    texts = dev["sentence"].astype(str).tolist()
    ensemble_speed = teacher_ensemble_speed(folders, texts)
    result = {"scale": scale, "train_rows": s["train_rows"], "teachers": [json.loads((f / "finetune.json").read_text())
                                                                         for f in folders],
              "teacher_ensemble_inputs_per_s": ensemble_speed, "students": {}}
    for kind, overrides in STUDENTS.items():
        run_name = f"own_teachers_{scale}_{kind}"
        started = time.perf_counter()
        code = job["main"]([str(CONFIG), *common, *overrides, f"run_name={run_name}"])
        if code != 0:
            raise RuntimeError(f"jobs/distill.py exited {code} for the {kind} student")
        r = json.loads((Path(storage_root) / run_name / "results.json").read_text())
        p = r["scores"]["sst2"]["primary"]
        speed = student_speed(kind, r["model_dir"], texts, r)
        result["students"][kind] = {"accuracy": p["student"], "ensemble_accuracy": p["ensemble"],
                                    "members": p["members"], "retained_pct": p["retained_pct"],
                                    "inputs_per_s": speed, "speedup_vs_ensemble": speed / ensemble_speed,
                                    "run_seconds": round(time.perf_counter() - started, 1),
                                    "overhead": r.get("overhead")}
    plot(result, out / f"own_teachers-{scale}.png")
    return {"result": result, "table": table(result)}


def finetuned(root: Path, data_dir: str, seed: int, s: dict) -> Path:
    """jobs/finetune_teachers.py's checkpoint for `seed`; fine-tuned only when not there with these settings."""
    folder = root / f"sst2-seed{seed}"
    info = folder / "finetune.json"
    if info.exists() and json.loads(info.read_text()).get("train_rows") == (s["train_rows"] or 60614):
        print(f"[own_teachers] reusing {folder}")
        return folder
    script = runpy.run_path(str(ROOT / "jobs" / "finetune_teachers.py"), run_name="finetune_teachers")
    args = ["--data-dir", data_dir, "--task", "sst2", "--out", str(root), "--seeds", str(seed),
            "--epochs", str(s["teacher_epochs"]), "--max-length", "64"]
    script["main"](args + ([] if s["train_rows"] is None else ["--max-train", str(s["train_rows"])]))
    return folder


def timed(fn) -> float:
    """Median seconds of REPEATS calls after one warm-up."""
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@torch.inference_mode()
def teacher_ensemble_speed(folders: list[Path], texts: list[str]) -> float:
    """Inputs/s of the K teachers (plain transformers, each its own tokenizer) on `texts`, batches of BATCH."""
    members = [(AutoTokenizer.from_pretrained(f), AutoModelForSequenceClassification.from_pretrained(f).eval())
               for f in folders]

    def run():
        for tok, model in members:
            for s in range(0, len(texts), BATCH):
                model(**tok(texts[s:s + BATCH], truncation=True, max_length=64, padding=True, return_tensors="pt"))

    return len(texts) / timed(run)


def student_speed(kind: str, model_dir: str, texts: list[str], results: dict) -> float:
    """Inputs/s of the run's student on `texts` (kdlib.predict, batches of BATCH)."""
    from kdlib.encoder import load_tokenizer, resolve_encoder_path

    tokenizer = load_tokenizer(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"))
    if kind == "branched":
        model, _ = load_model(model_dir)
        return len(texts) / timed(lambda: predict(model, tokenizer, texts, None, ["sst2"], max_length=64,
                                                  batch_size=BATCH))
    [name] = student_folders(model_dir)
    model, _ = load_student(Path(model_dir) / name)
    return len(texts) / timed(lambda: predict_student(model, tokenizer, texts, None, ["sst2"], max_length=64,
                                                      batch_size=BATCH))


def table(r: dict) -> str:
    rows = [["teacher ensemble (2 x MiniLM, fully fine-tuned)", next(iter(r["students"].values()))["ensemble_accuracy"],
             "-", r["teacher_ensemble_inputs_per_s"], "1.00x"]]
    for kind, x in r["students"].items():
        rows.append([f"{kind} student", x["accuracy"], x["retained_pct"], x["inputs_per_s"],
                     f"{x['speedup_vs_ensemble']:.2f}x"])
    members = " / ".join(f"{t['dev_accuracy']:.2f}" for t in r["teachers"])
    return (markdown_table(["model", "SST-2 dev accuracy", "retained %", "inputs/s (batch 128, CPU)",
                            "speed-up"], rows)
            + f"\n\nTeachers: {len(r['teachers'])} checkpoints fine-tuned with plain transformers on "
              f"{r['teachers'][0]['train_rows']} SST-2 rows, {r['teachers'][0]['epochs']} epochs "
              f"(members {members}); students distilled by kdlib from their logits.")


def plot(r: dict, path: Path) -> None:
    fig, (a, b) = figure((9, 3.5), ncols=2)
    names = ["ensemble", *r["students"]]
    acc = [next(iter(r["students"].values()))["ensemble_accuracy"], *(x["accuracy"] for x in r["students"].values())]
    speed = [1.0, *(x["speedup_vs_ensemble"] for x in r["students"].values())]
    grouped_bars(a, len(names), {"SST-2 dev accuracy": acc}, "%.1f")
    a.set_xticks(range(len(names)), names)
    a.set_ylim(min(acc) - 10, 100)
    a.set_title("quality")
    grouped_bars(b, len(names), {"speed-up": speed}, "%.1fx")
    b.set_xticks(range(len(names)), names)
    b.set_title("inputs/s against the teacher ensemble")
    save_figure(fig, path)
