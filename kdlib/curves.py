"""Training curves: every epoch's metrics of the run's training stages as TensorBoard event files and one PNG.

A history is a list of per-epoch rows, `{"epoch": e, "loss/<name>": ..., "dev/<name>": ..., "lr": ...}`:
the distill and fine_tune stages write one per run with a name per task (kdlib.train_loop.history_row),
a teacher ensemble one per task with a name per member (`<task>__m<k>`, kdlib.teachers). `histories` maps
a source ("distill", "fine_tune", "teachers/<task>") to its history; each source becomes one TensorBoard
run (`<folder>/<source>/`), so TensorBoard overlays them, and one line per name in the PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402  (Ray Tune's and Train's own TensorBoard writer)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_events(histories: dict[str, list[dict]], folder: str | Path) -> list[Path]:
    """One TensorBoard run per source in `folder/<source>/`: every finite metric but `epoch` as a scalar
    at step = epoch (a task without rows in an epoch has a NaN loss there: left out). Returns the run folders."""
    runs = []
    for source, rows in histories.items():
        run = Path(folder) / source
        with SummaryWriter(logdir=str(run)) as writer:
            for row in rows:
                for tag, value in row.items():
                    if tag != "epoch" and _finite(value):
                        writer.add_scalar(tag, float(value), global_step=int(row["epoch"]))
        runs.append(run)
    return runs


def task_names(rows: list[dict], kind: str, task: str) -> list[str]:
    """The names of `task`'s `kind` ("loss" or "dev") metrics in a history: the task's, or its members'."""
    names = {k.split("/", 1)[1] for row in rows for k in row if k.startswith(f"{kind}/")}
    return sorted(n for n in names if n == task or n.startswith(f"{task}__"))


def plot_curves(histories: dict[str, list[dict]], metrics: dict[str, str], target,
                baselines: dict[str, float] | None = None) -> None:
    """A PNG with one row per task (`metrics`: task -> its primary metric): training loss and dev score by
    epoch, one line per source and name (teacher members dashed), and the task's sanity baseline (kdlib.baselines)
    as a dotted level on the dev score. `target`: a path or a binary file."""
    tasks = list(metrics)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 2.8 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        for ax, kind, title in ((row_axes[0], "loss", "training loss"), (row_axes[1], "dev", f"dev {metrics[task]}")):
            for source, rows in histories.items():
                for name in task_names(rows, kind, task):
                    points = [(r["epoch"], r[f"{kind}/{name}"]) for r in rows if _finite(r.get(f"{kind}/{name}"))]
                    if not points:
                        continue
                    member = name.removeprefix(task).lstrip("_")  # "m0" for a teacher member, "" for the task
                    ax.plot(*zip(*points), marker="o", markersize=3, linestyle="--" if member else "-",
                            label=f"{source.split('/')[0]} {member}".strip())
            if kind == "dev" and task in (baselines or {}):
                ax.axhline(baselines[task], color="gray", linestyle=":", linewidth=1, label="baseline")
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.set_xlabel("epoch")
            last = max((int(x) for line in ax.lines for x in line.get_xdata()), default=1)  # (the baseline's: 0, 1)
            ax.set_xlim(0.5, last + 0.5)  # whole epochs, also for a one-epoch run
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=100)
    plt.close(fig)
