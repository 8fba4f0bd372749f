"""README's results table (jobs/benchmarks/readme.py), built from the repository's real bench-results/ files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import benchmark_module

readme = benchmark_module("readme")
RESULTS = Path(__file__).resolve().parent.parent / "bench-results"
BEFORE = "# kdlib\n\nProse above.\n\n<!-- results:begin (generated: python jobs/benchmark.py readme) -->\nold table\n"
AFTER = "<!-- results:end -->\n\nProse below.\n"


@pytest.fixture
def results(tmp_path) -> Path:
    """A copy of bench-results/'s JSON files, beside a README with the results markers."""
    folder = tmp_path / "bench-results"
    folder.mkdir()
    for name in ("demo-quick", "distill-quick", "labeling-quick", "labeling-full", "students-transfer",
                 "students-transfer-8-epochs", "tune-quick", "cluster-quick"):
        shutil.copy(RESULTS / f"{name}.json", folder)
    (tmp_path / "README.md").write_text(BEFORE + AFTER)
    return folder


def _load(results: Path, stem: str) -> dict:
    return json.loads((results / f"{stem}.json").read_text())


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by link target: [benchmark cell, headline, targets]."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ["):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].split("](")[1].rstrip(")")] = cells
    return rows


def test_the_table_replaces_what_stands_between_the_markers(results):
    path = results.parent / "README.md"
    assert readme.update_readme(path, results) is True
    text = path.read_text()
    assert text.startswith(BEFORE.replace("old table\n", "\n| benchmark | headline | targets |\n|---|---|---|\n"))
    assert text.endswith("\n\n" + AFTER) and "old table" not in text
    rows = _rows(text)
    # one row per benchmark result in the copied folder, in the benchmarks' order; the kept variant
    # students-transfer-8-epochs is no benchmark's current output, the files not copied have no row
    assert list(rows) == [f"bench-results/{s}.md" for s in ("demo-quick", "distill-quick", "labeling-quick",
                                                             "labeling-full", "students-transfer", "tune-quick",
                                                             "cluster-quick")]
    # the headline numbers are the files' own (the results change when a benchmark reruns; the keys do not)
    distill, students, labeling = (_load(results, f) for f in ("distill-quick", "students-transfer", "labeling-full"))
    assert rows["bench-results/distill-quick.md"] == [
        "[distill (quick)](bench-results/distill-quick.md)",
        f"merged student {distill['student_share_of_baseline_pct']:.1f}% of full fine-tuning at "
        f"{distill['overhead']:.1%} overhead", _met(distill["targets"]["met"])]
    bilstm, cmow = students["students"]["bilstm"], students["students"]["cmow"]
    assert rows["bench-results/students-transfer.md"][1] == (
        f"score and throughput against the teacher ensemble's: bilstm {bilstm['share_of_ensemble_pct']:.1f}% at "
        f"{bilstm['speedup_vs_ensemble']:.1f}x, cmow {cmow['share_of_ensemble_pct']:.1f}% at "
        f"{cmow['speedup_vs_ensemble']:.1f}x")
    spread = labeling["k1"]["spread"]  # the median of 3 runs, with the spread of the stage/baseline ratios
    assert rows["bench-results/labeling-full.md"][1] == (
        f"labeling stage {labeling['k1']['stage_vs_best_baseline']:.2f}x the best single-process baseline (median of "
        f"3 runs, {spread['end_to_end'][0]:.2f}-{spread['end_to_end'][1]:.2f}x; busy {spread['busy'][0]:.2f}-"
        f"{spread['busy'][1]:.2f}x); shared trunk {labeling['k3']['shared_gain']:.2f}x")
    missed = [k for k, ok in _load(results, "labeling-quick")["targets"]["met"].items() if not ok]
    assert rows["bench-results/labeling-quick.md"][2] == (f"NOT met ({', '.join(missed)})" if missed else "met")
    assert rows["bench-results/cluster-quick.md"][2] == "-"  # the cluster benchmark sets no target

    assert readme.update_readme(path, results) is False  # already current: README is not rewritten
    assert path.read_text() == text


def test_a_result_file_added_later_gets_its_row(results):
    path = results.parent / "README.md"
    readme.update_readme(path, results)
    shutil.copy(RESULTS / "serve-quick.json", results)
    assert readme.update_readme(path, results) is True
    serve, r = _rows(path.read_text())["bench-results/serve-quick.md"], _load(results, "serve-quick")
    g = r["round_gains"]
    assert serve[1:] == ["all-task requests/s, merged model / one deployment per task: "
                         f"median of {r['settings']['rounds']} rounds "
                         f"{g['all_b1']['median']:.2f}x ({g['all_b1']['min']:.2f}-{g['all_b1']['max']:.2f}x, batch 1), "
                         f"{g['all_b8']['median']:.2f}x ({g['all_b8']['min']:.2f}-{g['all_b8']['max']:.2f}x, batch 8); "
                         f"{r['errors']} errors",
                         _met(r["targets"]["all_met"])]


def test_verdicts():
    assert readme.verdict({"share_pct_at_least": 97.0, "met": False}) == "NOT met"
    assert readme.verdict({"met": {"a": True, "b": False}, "all_met": True}) == "met"  # all_met decides
    assert readme.verdict({"x": {"bilstm": False, "cmow": True}, "y": True}) == "NOT met (x.bilstm)"
    assert readme.verdict(None) == "-"


def test_a_readme_without_the_markers_is_named_and_left_alone(results):
    path = results.parent / "README.md"
    path.write_text("# kdlib\n\n<!-- results:begin -->\nno end marker\n")
    with pytest.raises(readme.MarkersMissing, match=r"README\.md has no results section.*<!-- results:begin.*"
                                                     r"<!-- results:end -->"):
        readme.update_readme(path, results)
    assert path.read_text() == "# kdlib\n\n<!-- results:begin -->\nno end marker\n"


def test_a_result_of_another_shape_is_named(results):
    (results / "tune-quick.json").write_text(json.dumps({"benchmark": "tune", "targets": {"met": True}}))
    with pytest.raises(ValueError, match=r"tune-quick\.json: not the results of today's tune benchmark"):
        readme.results_table(results, results.parent)
