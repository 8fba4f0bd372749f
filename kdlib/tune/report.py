"""The search's report: per-task score curves, the quality-versus-overhead plot and a Markdown summary."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kdlib.tune.selection import Candidate, Selection  # noqa: E402


def plot_tasks(cands: list[Candidate], path: Path) -> Path:
    """Per task: dev score against branch layers l, one line per L (students), teachers (l = L) as stars."""
    tasks = sorted({c.task for c in cands})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [c for c in cands if c.task == task]
        for L in sorted({c.L for c in mine}):
            pts = sorted((c.l, c.score) for c in mine if c.L == L and c.source == "student")
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=f"L={L}")
                for c in mine:
                    if c.L == L and c.source == "teacher":
                        ax.plot([c.l], [c.score], marker="*", markersize=11, color=line.get_color(), linestyle="")
        ax.set_title(f"{task} (stars: teacher member, no KD)")
        ax.set_xlabel("branch layers l")
        ax.set_ylabel("primary dev score")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curve(points: list[dict], chosen: dict, reference: float | None, path: Path) -> Path:
    """Average score against overhead for every threshold c and budget B; the chosen point and full FT marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for rule, marker in (("threshold", "o"), ("budget", "s")):
        pts = sorted((p["overhead"] * 100, p["average"]) for p in points if p["rule"] == rule)
        if pts:
            ax.plot(*zip(*pts), marker=marker, linestyle="-" if rule == "budget" else "", alpha=0.7,
                    label="layer budget B" if rule == "budget" else "threshold c")
    ax.plot([chosen["overhead"] * 100], [chosen["average"]], marker="*", markersize=16, color="red", linestyle="",
            label=f"chosen ({chosen['rule']} {chosen['setting']:g})")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
        ax.plot([100], [reference], marker="D", color="black", linestyle="", label="full fine-tuning")
    ax.set_xlabel("overhead (% of running every task's full encoder)")
    ax.set_ylabel("average primary dev score")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_grid(cands: list[Candidate], task: str) -> str:
    """Markdown table of one task's scores: a row per L (its teacher first), a column per branch size l."""
    mine = [c for c in cands if c.task == task]
    ls = sorted({c.l for c in mine if c.source == "student"})
    lines = [f"| {task}: L | teacher ensemble | teacher member (l = L) | " + " | ".join(f"l={l}" for l in ls) + " |",
             "|---" * (3 + len(ls)) + "|"]
    for L in sorted({c.L for c in mine}):
        row = {c.l: c.score for c in mine if c.L == L and c.source == "student"}
        member = next((f"{c.score:.2f}" for c in mine if c.L == L and c.source == "teacher"), "-")
        ens = next(c.teacher_score for c in mine if c.L == L)
        lines.append(f"| {L} | {ens:.2f} | {member} | " + " | ".join(f"{row[l]:.2f}" if l in row else "-" for l in ls)
                     + " |")
    return "\n".join(lines)


def summary_markdown(*, run_name: str, chosen: Selection, other: Selection | None, encoder_layers: int,
                     reference: dict[str, float] | None, table: pd.DataFrame, diffs: dict[str, float],
                     seconds: float, cands: list[Candidate]) -> str:
    """The run's summary: each task's chosen (L, l) and why, both rules, failed trials, the merge check."""
    lines = [f"# Depth search: {run_name}", "",
             f"Merged model by the **{chosen.rule}** rule ({'c' if chosen.rule == 'threshold' else 'B'} = "
             f"{chosen.setting:g}): average {chosen.average():.2f}, {chosen.total_layers(encoder_layers)} layers, "
             f"overhead {100 * chosen.overhead(encoder_layers):.1f}%"
             + (f", {100 * chosen.average() / _avg(reference):.1f}% of full fine-tuning ({_avg(reference):.2f})"
                if reference else "") + ".", "",
             "| task | L | l | branch | depth | score | full FT | why |", "|---|---|---|---|---|---|---|---|"]
    for task, c in chosen.choice.items():
        ref = f"{reference[task]:.2f}" if reference else "-"
        lines.append(f"| {task} | {c.L} | {c.l} | {c.source} | {encoder_layers - c.L} | {c.score:.2f} | {ref} | "
                     f"{chosen.reasons[task]} |")
    if other is not None:
        lines += ["", f"The **{other.rule}** rule ({other.setting:g}) would give: "
                  + ", ".join(f"{t} (L={c.L}, l={c.l})" for t, c in other.choice.items())
                  + f"; average {other.average():.2f} at {100 * other.overhead(encoder_layers):.1f}% overhead."]
    lines += ["", "Merged outputs against each task's own model (max |difference| on dev): "
              + ", ".join(f"{t} {d:.1e}" for t, d in diffs.items()) + "."]
    lines += ["", "Dev scores of every (L, l) tried (a trial ASHA stopped counts with its last reported score, "
              "unless a selection used it: then it was trained to its last epoch first):"]
    for task in chosen.choice:
        lines += ["", score_grid(cands, task)]
    failed = table[table["status"] == "error"]
    stopped = table[table["stopped_early"].astype(bool)]
    finished = table[table["finished_after_stop"].astype(bool)]
    lines += ["", f"Trials: {len(table)} ({len(stopped) + len(finished)} stopped early by ASHA, of which "
              f"{len(finished)} trained to the end because a selection used them; {len(failed)} failed); "
              f"wall time {seconds:.0f}s."]
    for _, r in failed.iterrows():
        lines.append(f"- failed: {r['task']} L={r['L']} l={r['l']}: {r['error']}")
    lines += ["", "Plots: `tasks.png` (score against branch layers per L), `curve.png` (average score against "
              "overhead for every c and B)."]
    return "\n".join(lines) + "\n"


def _avg(reference: dict[str, float]) -> float:
    return sum(reference.values()) / len(reference)
