"""jobs/benchmark.py's --config and --set: the pipeline config the distill and tune benchmarks run, and overrides
after their own (how the GPU machine runs them at full size on configs/glue_mini_gpu.yaml with real weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent


def _main():
    import runpy

    sys.path.insert(0, str(ROOT / "jobs"))
    return runpy.run_path(str(ROOT / "jobs" / "benchmark.py"), run_name="benchmark_job")["main"]


@pytest.mark.parametrize("argv, says", [
    (["labeling", "--set", "distill.epochs=1"], "the labeling benchmark takes no pipeline config (distill and tune do)"),
    (["distill", "--set", "distill.epochs"], "--set distill.epochs: expected KEY=VALUE"),
    (["tune", "--config", "configs/nowhere.yaml"], "--config configs/nowhere.yaml: no such file"),
])
def test_misused_pipeline_options_fail_before_ray_starts_naming_the_option(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _main()([*argv, "--out", str(tmp_path / "out"), "--storage-root", str(tmp_path / "runs")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_the_overrides_reach_the_distill_benchmarks_pipeline_config(ray_session, tmp_path, capsys):
    """A --set value the pipeline's config refuses fails the pipeline with the config's error naming the key:
    the override went into the config the benchmark runs (configs/glue_mini_gpu.yaml here), after its own."""
    with pytest.raises(AssertionError, match="the distillation pipeline failed"):
        _main()(["distill", "--config", str(ROOT / "configs" / "glue_mini_gpu.yaml"), "--set", "distill.epochs=many",
                 "--out", str(tmp_path / "out"), "--storage-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert "distill.epochs" in err and "many" in err


def test_the_report_names_the_command_with_its_pipeline_options(tmp_path):
    common = benchmark_module("common")
    stem = common.write_report("distill", "full", {"result": {"x": 1}, "table": "| a |"}, tmp_path,
                               ["--config configs/glue_mini_gpu.yaml", "--set encoder.path=/m"])
    assert ("`python jobs/benchmark.py distill --scale full --config configs/glue_mini_gpu.yaml --set encoder.path=/m`"
            in stem.with_suffix(".md").read_text())
