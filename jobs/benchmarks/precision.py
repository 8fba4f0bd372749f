"""`jobs/benchmark.py precision`: bf16 against fp32 on this machine's CPU, stage by stage, side by side.

    python jobs/benchmark.py precision --scale full

CPUs with AMX (Intel Xeon from Sapphire Rapids on) multiply bf16 natively, several times faster than fp32;
kdlib's `precision: bf16` (CPU autocast; weights stay fp32) uses that on CPU as it does on a GPU. Measured in
one run, fp32 and bf16 taking turns round by round:
- dense matmul GFLOP/s (2048 x 2048, the run's threads) in fp32 and bf16: what the hardware offers;
- labeling: the labeling stage (the glue-mini config's actors) with K = 3 MiniLM members sharing the bottom 4
  of 6 layers over the same fixed-length inputs: examples/s end to end and while busy, and how far the bf16
  soft targets are from the fp32 ones (largest |logit difference|, argmax agreement);
- the demo pipeline (`python jobs/distill.py configs/demo.yaml ... precision=...`) from an empty storage
  root: wall time, each stage's seconds, the student's dev scores;
- serving: that run's merged model loaded by kdlib.serve (one torch thread, as a replica has), all-task
  requests of 1 and 32 inputs: ms per request, and the largest difference of its outputs from fp32.
Ratios are bf16 / fp32 within each round; the median round is reported with the spread of all rounds.
Targets (a CPU with native bf16): the demo pipeline faster in bf16; no bf16 student more than 1 point below
fp32 on any task (above is no loss: bf16 changes the training trajectory, the demo's 300-row dev sets move by
a point either way); bf16 soft targets' argmax equal to fp32's on >= 99% of inputs.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import GLUE_MINI, ROOT, distill_job, figure, fixed_length_texts, save_figure, scratch_dir
from benchmarks.labeling import label_with_stage, matmul_gflops
from kdlib.config import load_run_config
from kdlib.device import cpu_bf16_support
from kdlib.scoring import markdown_table

# (labeling inputs, rounds): each round labels the inputs and runs the demo pipeline once in each precision
SCALES = {"quick": (1536, 1), "full": (6144, 3)}
PRECISIONS = ("fp32", "bf16")
SERVE_BATCHES = (1, 32)
TARGETS = {"demo_gain_above": 1.0, "student_points_below_at_most": 1.0, "argmax_agreement_at_least": 0.99}


def precision_benchmark(scale: str, data_dir: str, out: Path, storage_root: str) -> dict:
    """bf16 against fp32 on the CPU: matmul, the labeling stage, the demo pipeline and serving."""
    from kdlib.branched import BranchedModel, BranchSpec, member_name
    from kdlib.encoder import load_encoder, load_tokenizer, resolve_encoder_path
    from kdlib.pipeline.data import load_tasks

    n, rounds = SCALES[scale]
    seq, bs = 64, 64
    cfg = load_run_config(GLUE_MINI, [f"data_dir={data_dir}"])
    source = resolve_encoder_path(cfg.encoder.name, cfg.encoder.path)
    encoder, tokenizer = load_encoder(source), load_tokenizer(source)
    texts = fixed_length_texts(load_tasks(cfg)["sst2"].train["text"].tolist(), tokenizer, n, seq)
    layers = encoder.config.num_hidden_layers
    specs = [BranchSpec(member_name("t", m), "classification", 2, 4, layers - 4) for m in range(3)]
    ensemble = BranchedModel.from_encoder(encoder, specs, seed=3).eval()
    work = scratch_dir(storage_root, "kdlib-precision-bench-")
    threads = cfg.labeling.num_actors * cfg.labeling.torch_threads

    print("[precision-bench] matmul fp32 / bf16 ...", flush=True)
    matmul = {p: matmul_gflops(p, threads) for p in PRECISIONS}
    runs = []
    for r in range(rounds):
        run: dict = {"labeling": {}, "demo": {}, "serve": {}}
        order = PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]  # neither precision always goes first
        for p in order:
            print(f"[precision-bench] round {r + 1}/{rounds}, {p}: labeling stage (K = 3, {n} inputs) ...", flush=True)
            run["labeling"][p] = label_with_stage(ensemble, texts, work / f"label-{r}-{p}", cfg=cfg, source=source,
                                                  seq=seq, bs=bs, precision=p, keep_logits=True)
        for p in order:
            print(f"[precision-bench] round {r + 1}/{rounds}, {p}: demo pipeline from empty storage ...", flush=True)
            run["demo"][p] = demo_run(work / f"demo-{r}-{p}", p)
        run["serve"] = serve_latency(run["demo"]["fp32"]["model_dir"])
        runs.append(summarize_round(run))
    shutil.rmtree(work, ignore_errors=True)

    median = sorted(runs, key=lambda x: x["demo_gain"])[len(runs) // 2]
    spread = {k: [min(x[k] for x in runs), max(x[k] for x in runs)]
              for k in ("demo_gain", "labeling_gain", "labeling_busy_gain")}
    native = cpu_bf16_support()
    met = {"demo_faster": median["demo_gain"] > TARGETS["demo_gain_above"],
           "students_not_below": all(d >= -TARGETS["student_points_below_at_most"]
                                  for x in runs for d in x["student_points"].values()),
           "argmax_agreement": min(x["agreement"]["argmax"] for x in runs) >= TARGETS["argmax_agreement_at_least"]}
    result = {"benchmark": "precision", "scale": scale, "cpu_bf16": native, "threads": threads, "inputs": n,
              "seq_len": seq, "batch_size": bs, "rounds": rounds, "matmul_gflops": matmul,
              "median_round": median, "spread": spread, "runs": runs,
              "targets": {**TARGETS, "met": met}}
    _plot(result, out / f"precision-{scale}.png")
    return {"result": result, "table": _table(result)}


def demo_run(root: Path, precision: str) -> dict:
    """`python jobs/distill.py configs/demo.yaml` in `precision` from the empty storage root `root`."""
    started = time.perf_counter()
    assert distill_job()["main"]([str(ROOT / "configs" / "demo.yaml"), f"storage_root={root}",
                                  f"precision={precision}"]) == 0, f"the demo pipeline failed in {precision}"
    seconds = time.perf_counter() - started
    run = json.loads((root / "demo" / "results.json").read_text())
    stages: dict[str, float] = {}
    for s in run["stages"]:  # a stage's tasks run at once (teachers: one Ray task per task): its wall is the longest
        stages[s["name"]] = max(stages.get(s["name"], 0.0), s["seconds"])
    return {"seconds": seconds, "stages": stages, "model_dir": run["model_dir"],
            "student": {t: s["primary"]["student"] for t, s in run["scores"].items()},
            "metric": {t: s["metric"] for t, s in run["scores"].items()}}


def serve_latency(model_dir: str, requests: int = 30) -> dict:
    """kdlib.serve's merged model in each precision, one torch thread: all-task requests of 1 and 32 demo
    inputs (sentence pairs), median ms per request; the largest output difference of bf16 from fp32. Beside
    them "bf16_cast": autocast over the fp32 weights, casting them on every request (what bf16 serving did
    before kdlib.device.hold_linear_weights)."""
    from kdlib.serve.model import Job, ServedModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        served = {p: ServedModel.load(model_dir, precision=p) for p in PRECISIONS}
        served["bf16_cast"] = ServedModel.load(model_dir)
        served["bf16_cast"].precision = "bf16"
        tasks = tuple(served["fp32"].tasks)
        pair_task = next(t for t in tasks if served["fp32"].tasks[t]["pair"])
        rows = demo_pairs(pair_task, max(SERVE_BATCHES))
        out: dict = {"ms": {}, "max_abs_diff": {}}
        for b in SERVE_BATCHES:
            job = Job([a for a, _ in rows[:b]], [p for _, p in rows[:b]], tasks)
            answers = {}
            for name, model in served.items():
                for _ in range(3):
                    model.infer([job])
                times = []
                for _ in range(requests):
                    start = time.perf_counter()
                    answers[name] = model.infer([job])[0]
                    times.append(time.perf_counter() - start)
                out["ms"][f"{name}_b{b}"] = 1000 * statistics.median(times)
            out["max_abs_diff"][f"b{b}"] = max(
                abs(float(np.max(np.abs(np.asarray(_value(x[t])) - np.asarray(_value(y[t]))))))
                for x, y in zip(answers["fp32"], answers["bf16"]) for t in tasks)
        return out
    finally:
        torch.set_num_threads(threads)


def _value(answer: dict):
    """The numbers in one task's answer: a classifier's probabilities or a regressor's score."""
    return list(answer["probabilities"].values()) if "probabilities" in answer else [answer["score"]]


def demo_pairs(task: str, n: int) -> list[tuple[str, str]]:
    """`n` (text, text pair) inputs from the built-in demo's dev set of `task` (repeated if it has fewer)."""
    from kdlib.pipeline.data import load_tasks

    cfg = load_run_config(ROOT / "configs" / "demo.yaml", [])
    dev = load_tasks(cfg)[task].dev
    rows = list(zip(dev["text"].tolist(), dev["text_pair"].tolist()))
    return [rows[i % len(rows)] for i in range(n)]


def agreement(fp32: np.ndarray, bf16: np.ndarray) -> dict:
    """How far bf16 soft targets are from fp32's on the same inputs, both (N, K, C): the largest |logit
    difference|, its mean, both also relative to the spread (standard deviation) of the fp32 logits, and the
    share of (input, member) whose argmax class is the same (random-init heads give small margins: a flip is a
    near-tie)."""
    if fp32.shape != bf16.shape:
        raise ValueError(f"soft targets of shapes {fp32.shape} and {bf16.shape}: not the same inputs")
    diff, spread = np.abs(fp32 - bf16), float(fp32.std())
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "fp32_logit_std": spread, "max_relative": float(diff.max()) / spread,
            "mean_relative": float(diff.mean()) / spread, "argmax": float(np.mean(fp32.argmax(-1) == bf16.argmax(-1)))}


def summarize_round(run: dict) -> dict:
    """One round's bf16 / fp32 ratios, the soft targets' agreement and the students' score differences."""
    lab, demo = run["labeling"], run["demo"]
    return {
        "labeling": {p: {k: v for k, v in lab[p].items() if k != "logits"} for p in PRECISIONS},
        "labeling_gain": lab["bf16"]["examples_per_s"] / lab["fp32"]["examples_per_s"],
        "labeling_busy_gain": lab["bf16"]["steady_examples_per_s"] / lab["fp32"]["steady_examples_per_s"],
        "agreement": agreement(lab["fp32"]["logits"], lab["bf16"]["logits"]),
        "demo": {p: {k: v for k, v in demo[p].items() if k != "model_dir"} for p in PRECISIONS},
        "demo_gain": demo["fp32"]["seconds"] / demo["bf16"]["seconds"],
        "stage_gains": {s: demo["fp32"]["stages"][s] / max(demo["bf16"]["stages"].get(s, 0.0), 1e-9)
                        for s in demo["fp32"]["stages"]},
        "student_points": {t: demo["bf16"]["student"][t] - demo["fp32"]["student"][t] for t in demo["fp32"]["student"]},
        "serve": run["serve"],
    }


def _table(result: dict) -> str:
    m, spread = result["median_round"], result["spread"]
    lab, demo, serve = m["labeling"], m["demo"], m["serve"]
    rows = [["dense matmul (GFLOP/s)", result["matmul_gflops"]["fp32"], result["matmul_gflops"]["bf16"],
             result["matmul_gflops"]["bf16"] / result["matmul_gflops"]["fp32"]],
            ["labeling stage, K=3, end to end (examples/s)", lab["fp32"]["examples_per_s"],
             lab["bf16"]["examples_per_s"], m["labeling_gain"]],
            ["labeling stage, K=3, actors busy (examples/s)", lab["fp32"]["steady_examples_per_s"],
             lab["bf16"]["steady_examples_per_s"], m["labeling_busy_gain"]],
            ["demo pipeline, empty storage (s)", demo["fp32"]["seconds"], demo["bf16"]["seconds"], m["demo_gain"]]]
    rows += [[f"  stage {s} (s)", demo["fp32"]["stages"][s], demo["bf16"]["stages"].get(s, float("nan")), g]
             for s, g in m["stage_gains"].items()]
    rows += [[f"serving, all-task request of {b} (ms, 1 thread)", serve["ms"][f"fp32_b{b}"], serve["ms"][f"bf16_b{b}"],
              serve["ms"][f"fp32_b{b}"] / serve["ms"][f"bf16_b{b}"]] for b in SERVE_BATCHES]
    table = markdown_table(["measure", "fp32", "bf16", "bf16 gain"], rows)
    scores = [[t, demo["fp32"]["metric"][t], demo["fp32"]["student"][t], demo["bf16"]["student"][t],
               m["student_points"][t]] for t in demo["fp32"]["student"]]
    table += "\n\nThe demo's student, dev scores:\n\n" + markdown_table(
        ["task", "metric", "fp32", "bf16", "bf16 - fp32 (points)"], scores)
    a = m["agreement"]
    native = result["cpu_bf16"] or "none"
    rounds = result["rounds"]
    table += (f"\n\nCPU bf16 support: {native}; {result['threads']} threads. Gains are fp32 time / bf16 time (above 1: "
              f"bf16 faster). The median of {rounds} round{'s' * (rounds > 1)} by the demo's gain"
              + (f"; over the rounds: demo {spread['demo_gain'][0]:.2f}-{spread['demo_gain'][1]:.2f}x, labeling end "
                 f"to end {spread['labeling_gain'][0]:.2f}-{spread['labeling_gain'][1]:.2f}x, busy "
                 f"{spread['labeling_busy_gain'][0]:.2f}-{spread['labeling_busy_gain'][1]:.2f}x" if rounds > 1 else "")
              + f". Labeling: {result['inputs']} inputs of {result['seq_len']} tokens, batch {result['batch_size']}; "
              f"bf16 soft targets against fp32 (random-init members, fp32 logits' standard deviation "
              f"{a['fp32_logit_std']:.3f}): largest |logit difference| {a['max_abs_logit_diff']:.4f} "
              f"({100 * a['max_relative']:.2f}% of that spread; mean {100 * a['mean_relative']:.3f}%), argmax the same "
              f"on {100 * a['argmax']:.2f}% of (input, member), the others near-ties. "
              f"Serving: largest output difference (probabilities, scores) "
              + ", ".join(f"{v:.3f} at batch {k[1:]}" for k, v in serve["max_abs_diff"].items())
              + "; bf16 casting the fp32 weights on every request instead of holding them in bf16: "
              + ", ".join(f"{serve['ms'][f'bf16_cast_b{b}']:.1f} ms at batch {b}" for b in SERVE_BATCHES)
              + ".\n\nTargets: ")
    met = result["targets"]["met"]
    table += "; ".join(f"{name}: {'met' if met[key] else 'NOT met'}" for name, key in (
        ("demo pipeline faster in bf16", "demo_faster"), ("no bf16 student more than 1 point below fp32", "students_not_below"),
        ("soft-target argmax agreement >= 99%", "argmax_agreement"))) + "."
    return table


def _plot(result: dict, path: Path) -> None:
    m = result["median_round"]
    stages = {s: g for s, g in m["stage_gains"].items() if m["demo"]["fp32"]["stages"][s] >= 5}  # not merge's 1 s
    labels = ["matmul", "labeling\nend to end", "labeling\nbusy", "demo\npipeline",
              *[f"stage\n{s}" for s in stages], *[f"serve\nbatch {b}" for b in SERVE_BATCHES]]
    serve = m["serve"]["ms"]
    values = [result["matmul_gflops"]["bf16"] / result["matmul_gflops"]["fp32"], m["labeling_gain"],
              m["labeling_busy_gain"], m["demo_gain"], *stages.values(),
              *[serve[f"fp32_b{b}"] / serve[f"bf16_b{b}"] for b in SERVE_BATCHES]]
    fig, ax = figure((9, 4))
    bars = ax.bar(labels, values, color=["#1f77b4" if v >= 1 else "#d62728" for v in values])
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="#555", lw=0.8, ls="--")
    ax.set_ylabel("bf16 gain (fp32 time / bf16 time)")
    ax.set_title(f"bf16 against fp32 on this CPU ({result['cpu_bf16'] or 'no native bf16'}), median round")
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)
