"""The report and what a user sees of runs: names, the grid's parent summary, the UI's defaults, the report's
tables and plots, from real runs (Hydra, MLflow on SQLite, transformers on the tiny model, hf and compiled)."""

import json

import pandas as pd
import pytest
from conftest import QUICK, mlflow_runs, run_sweep

from sweep.measure.summary import summary_table, unsteady_figures
from sweep.report.build import main as report_main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A grid of two hf runs under a parent, and one compiled run beside it, in one MLflow store."""
    work = tmp_path_factory.mktemp("report")
    grid = run_sweep(work, "-m", *QUICK, "engine.max_batch_size=1,2")
    assert grid.returncode == 0, grid.stderr[-3000:]
    # compile_mode=none: the compiled engine's code path without minutes of CPU compiling
    compiled = run_sweep(work, *QUICK, "backend=compiled", "engine.compile_mode=none", "engine.cuda_graphs=false")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    return work, grid.stdout, mlflow_runs(work)


def test_runs_are_named_after_what_they_are_and_the_grid_parent_has_a_summary(store):
    work, stdout, runs = store
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "multirun"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "grid: engine.max_batch_size=1,2"
    assert sorted(r.info.run_name for r in children) == ["tiny/hf max_batch_size=1", "tiny/hf max_batch_size=2"]
    (compiled,) = [r for r in runs if r.data.tags.get("backend") == "compiled"]
    assert compiled.info.run_name.startswith("tiny/compiled ") and "compile_mode=none" in compiled.info.run_name

    best = max(children, key=lambda r: r.data.metrics["output_throughput_tok_s"])
    assert parent.data.metrics["best.output_throughput_tok_s"] == best.data.metrics["output_throughput_tok_s"]
    assert parent.data.params["best.engine.max_batch_size"] == best.data.params["engine.max_batch_size"]
    assert parent.data.params["best.run_id"] == best.info.run_id and parent.data.metrics["runs.finished"] == 2
    # the end of the sweep says where to look
    assert f"sweep {parent.info.run_id}: http://127.0.0.1:5000/#/experiments/" in stdout
    assert "report: " in stdout and "comparison.md" in stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    tags = client.get_experiment_by_name("sweep").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.sweep"])  # the runs table's default columns
    assert "metrics.`output_throughput_tok_s`" in view["selectedColumns"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/comparison.md",
        "report/runs.csv",
        "report/throughput_vs_engine_max_batch_size.png",
    }


def test_report_of_hand_picked_runs_of_two_backends(store, tmp_path, capsys):
    work, _, runs = store
    picked = [r for r in runs if r.data.tags.get("backend") in ("hf", "compiled")]
    assert len(picked) == 3
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    out = tmp_path / "report"
    ids = ",".join(r.info.run_id for r in picked)
    assert report_main(["--uri", uri, "--runs", ids, "--out", str(out)]) == 0

    text = (out / "comparison.md").read_text()
    assert "- **backend**: compiled, hf" in text and "- **model**: tiny" in text and "- **device**: cpu" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| run ", "| ---"))]
    assert len(rows) == 3 and sum("(**best**" in row for row in rows) == 1
    assert sum("baseline" in row for row in rows) == 1
    (baseline_row,) = [row for row in rows if "baseline" in row]
    assert baseline_row.startswith("| hf, max_batch_size=")  # the seed's baseline: an hf run
    assert "TTFT P50 (ms)" in text and "output throughput (tok/s)" in text and "1.00×" in baseline_row
    # best first
    table = pd.read_csv(out / "comparison.csv")
    throughput = table["output throughput (tok/s)"]
    assert list(throughput) == sorted(throughput, reverse=True)

    listed = pd.read_csv(out / "runs.csv")
    assert list(listed.columns[:4]) == ["run_id", "name", "backend.name", "engine.max_batch_size"]
    assert len(listed.columns) < 40 and len(listed) == 3
    assert all(len(f"{v:g}".replace(".", "").lstrip("0")) <= 4 for v in listed["output_throughput_tok_s"])
    assert (out / "throughput_vs_backend_name.png").is_file() and (out / "pareto_front.png").is_file()
    assert "report written to" in capsys.readouterr().out


def test_report_names_a_run_id_it_cannot_find(store, tmp_path, capsys):
    work, _, runs = store
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    assert report_main(["--uri", uri, "--runs", f"{runs[0].info.run_id},nosuchrun", "--out", str(tmp_path)]) == 2
    assert "--runs: no run nosuchrun in this experiment" in capsys.readouterr().err


def test_iterations_that_disagree_are_flagged():
    figures = {
        "output_throughput_tok_s": 500.0,
        "output_throughput_tok_s_min": 89.0,
        "output_throughput_tok_s_max": 2831.0,
        "iterations": 3,
    }
    assert unsteady_figures(figures) == ["output_throughput_tok_s"]
    assert "WARNING: output throughput ranged 89.00-2831.00 tok/s" in summary_table("t", figures)
    steady = figures | {"output_throughput_tok_s_min": 480.0, "output_throughput_tok_s_max": 520.0}
    assert unsteady_figures(steady) == [] and "WARNING" not in summary_table("t", steady)
