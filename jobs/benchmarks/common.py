"""What the benchmarks share: where things are, the pipeline job, the labeling workload's texts, figures, and
writing a benchmark's results (<out>/<name>-<scale>.json and .md; each benchmark draws its own .png)."""

from __future__ import annotations

import json
import runpy
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GLUE_MINI = ROOT / "configs" / "glue_mini.yaml"


def distill_job() -> dict:
    """jobs/distill.py's namespace: its `main(argv)` runs the whole pipeline in this process."""
    return runpy.run_path(str(ROOT / "jobs" / "distill.py"), run_name="distill_job")


def tune_depth_job() -> dict:
    """jobs/tune_depth.py's namespace: its `benchmark(...)` runs the depth sweep in this process."""
    return runpy.run_path(str(ROOT / "jobs" / "tune_depth.py"), run_name="tune_job")


def scratch_dir(root: str | Path, prefix: str) -> Path:
    """A new empty folder `<root>/<prefix>XXXX` (root created when missing): a run that starts from empty storage."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def row_caps(tasks, cap: int | None) -> list[str]:
    """Overrides that cap every task's training rows at `cap` (None: all of them)."""
    return [f"tasks.{t}.max_train_examples={'null' if cap is None else cap}" for t in tasks]


def fixed_length_texts(sentences: list[str], tokenizer, n: int, seq: int) -> list[str]:
    """`n` inputs of exactly `seq` tokens: consecutive sentences joined until cut at `seq`, so that every
    method does the same work whatever its padding strategy (the labeling and cluster benchmarks' workload)."""
    texts = [" ".join(sentences[(i * 24 + j) % len(sentences)] for j in range(24)) for i in range(n)]
    assert all(len(x) == seq for x in tokenizer(texts, truncation=True, max_length=seq)["input_ids"])
    return texts


def figure(figsize: tuple[float, float], ncols: int = 1):
    """(figure, axes) of one row of `ncols` plots."""
    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_chart(path: Path, labels: list[str], values: list[float], *, ylabel: str, title: str, fmt: str,
              colors=None, figsize=(7, 4), title_size=None) -> None:
    """One bar per label, each with its value written on it."""
    fig, ax = figure(figsize)
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt=fmt, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    save_figure(fig, path)


def grouped_bars(ax, groups: int, series: dict[str, list[float]], fmt: str) -> None:
    """Bars of every series side by side at each of `groups` positions 0..groups-1, values written on them."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(groups)], values, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=7)


def write_report(name: str, scale: str, report: dict, out: Path, flags: list[str] = ()) -> Path:
    """The benchmark's result as <out>/<name>-<scale>.json and its table as .md, under the command that made
    them (`flags`: its --config and --set options); returns the path stem."""
    stem = Path(out) / f"{name}-{scale}"
    stem.with_suffix(".json").write_text(json.dumps(report["result"], indent=2))
    command = " ".join([f"python jobs/benchmark.py {name} --scale {scale}", *flags])
    stem.with_suffix(".md").write_text(f"# {name} ({scale})\n\n`{command}`\n\n{report['table']}\n")
    return stem
