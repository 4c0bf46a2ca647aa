"""The report and what a user sees of runs: names, the grid's parent summary, the UI's defaults, the report's
tables and plots, from real runs (Hydra, MLflow on SQLite, transformers on the tiny model, hf and compiled)."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import QUICK, mlflow_runs, run_sweep

from sweep.measure.summary import summary_table, unsteady_figures
from sweep.report.cli import main as report_main


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


# -- load sweeps, searches and the model that ran -------------------------------------------------------------
LOAD_QUICK = [
    "workload=rate",
    "workload.num_requests=3",
    "workload.warmup_requests=0",
    "workload.iterations=1",
    "workload.input_len=8",
    "workload.output_len=4",
]


def sweep_report(stdout: str):
    """The comparison.md a sweep printed it wrote, and the directory beside it."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("report: ")]
    path = Path(line.removeprefix("report: "))
    return path.read_text(), path.parent


@pytest.fixture(scope="module")
def load_store(tmp_path_factory, tiny_checkpoint):
    """A load sweep as a user starts one, on a checkpoint given by its directory (model.path)."""
    work = tmp_path_factory.mktemp("load")
    grid = run_sweep(
        work,
        "-m",
        *LOAD_QUICK,
        "workload.request_rate=4,16,48",
        "slo=interactive",
        f"model.path={tiny_checkpoint}",
    )
    assert grid.returncode == 0, grid.stderr[-3000:]
    return work, grid.stdout, mlflow_runs(work)


def test_a_load_sweep_leads_with_the_highest_rate_that_held_the_slo(load_store, tiny_checkpoint):
    work, stdout, runs = load_store
    text, out = sweep_report(stdout)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    attainment = {float(r.data.params["workload.request_rate"]): r.data.metrics["slo_attainment_pct"] for r in children}
    assert sorted(attainment) == [4.0, 16.0, 48.0]
    held = [rate for rate, pct in attainment.items() if pct >= 99.0]
    assert text.startswith("# load sweep: the highest request rate that held the SLO\n")
    headline = text.split("\n\n")[1]
    rule = "a rate holds when TTFT <= 500 ms, TPOT <= 50 ms in >= 99% of requests"
    if held:  # what the machine managed decides which; the report must say what the runs recorded
        assert headline.startswith(f"**{max(held):g} req/s** is the highest offered rate that held the SLO ({rule})")
    else:
        assert headline.startswith(f"**no rate tried held** ({rule}): even the lowest, 4 req/s")
    assert "speedup" not in text and "×" not in text and "(**best**" not in text
    # the model that ran: the checkpoint's directory, not the preset model.path overrode
    assert f"- **model**: {tiny_checkpoint.name} (checkpoint {tiny_checkpoint})" in text
    assert "- **model**: tiny (" not in text

    table = pd.read_csv(out / "comparison.csv")
    assert list(table.columns[2:8]) == [
        "request rate (req/s)",
        "achieved rate (req/s)",
        "SLO attainment (%)",
        "goodput (req/s)",
        "queue time P99 (ms)",
        "TTFT P99 (ms)",
    ]
    assert list(table["request rate (req/s)"]) == [4.0, 16.0, 48.0]  # rates ascending, not "best" first
    assert list(table["held"]) == [attainment[rate] >= 99.0 for rate in (4.0, 16.0, 48.0)]
    assert (out / "load_curve.png").is_file() and not list(out.glob("throughput_vs_*"))


def test_the_load_curve_reads_on_a_log_rate_axis_with_the_slo_drawn(load_store, tmp_path):
    from sweep.report import build_report
    from sweep.report.load_plots import load_curve_figure

    work, _, runs = load_store
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "multirun"]
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    report = build_report(uri, "sweep", tmp_path, parent_id=parent.info.run_id)
    assert report.baseline is None and report.load is not None
    fig = load_curve_figure(report.load, report.goal.objective)
    panels = {ax.get_title(): ax for ax in fig.axes}
    latency, attainment = panels["P99 latency (lower is better)"], panels["SLO attainment (higher is better)"]
    served = panels["goodput and achieved rate (higher is better)"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "offered request rate (req/s)"
        assert ax.get_ylim()[0] == 0 and ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "16", "48"]
    levels = {line.get_label(): set(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
    assert levels["SLO: TTFT <= 500 ms"] == {500} and levels["SLO: TPOT <= 50 ms"] == {50}
    assert levels["target 99%"] == {99}
    assert {"attainment"} <= {line.get_label() for line in attainment.get_lines()}
    assert {"goodput", "achieved", "offered"} <= {line.get_label() for line in served.get_lines()}
    assert latency.get_ylabel() == "latency P99 (ms)" and attainment.get_ylabel() == "SLO attainment (%)"
    assert served.get_ylabel() == "requests per second (req/s)"


def test_a_load_sweep_report_refuses_an_slo_target_out_of_range(load_store, tmp_path, capsys):
    work, _, _ = load_store
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    assert report_main(["--uri", uri, "--slo-target", "150", "--out", str(tmp_path)]) == 2
    assert "--slo-target=150.0 is not allowed; it is a percentage in (0, 100]" in capsys.readouterr().err


def test_the_highest_rate_that_held_per_set_up_and_what_broke_above_it():
    """The capacity logic on recorded figures of two set-ups: one breaks above 4 req/s, one dips at 4 and holds
    up to 48 (figures written here, as a load sweep records them)."""
    from sweep.report.load import analyse, is_load_sweep, slo_target
    from sweep.report.objective import resolve_goal

    rows = [(1, 4, 100.0), (1, 16, 80.0), (1, 48, 10.0), (2, 4, 95.0), (2, 16, 100.0), (2, 48, 99.5)]
    runs = pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(len(rows))],
            "params.engine.max_batch_size": [str(b) for b, _, _ in rows],
            "params.workload.request_rate": [f"{rate:.1f}" for _, rate, _ in rows],
            "params.workload.scenario": "rate",
            "params.slo.ttft_ms": "500",
            "params.slo.tpot_ms": "None",
            "params.slo.name": "custom",
            "metrics.slo_attainment_pct": [pct for _, _, pct in rows],
            "metrics.output_throughput_tok_s": 10.0,
            "metrics.achieved_rate_req_s": [rate for _, rate, _ in rows],
            "tags.saturated": "False",
        }
    )
    swept = ["params.engine.max_batch_size", "params.workload.request_rate"]
    assert is_load_sweep(runs, swept) and not is_load_sweep(runs.assign(**{"params.workload.scenario": "x"}), swept)
    goal = resolve_goal(runs, {})
    assert slo_target(None, {}, goal) == (99.0, "the default")
    assert slo_target(None, {"max_rate.attainment_pct": "90.0"}, goal)[0] == 90.0
    constrained = resolve_goal(runs, {"optuna.constraints": '{"slo_attainment_pct": ">=95.0"}'})
    assert slo_target(None, {}, constrained) == (95.0, "the sweep's constraint")

    load = analyse(runs, swept, 99.0, "the default")
    one, two = load.capacities
    assert (one.group, one.held_rate, one.broke_rate, one.dips) == ("max_batch_size=1", 4.0, 16.0, ())
    assert (two.group, two.held_rate, two.broke_rate, two.dips) == ("max_batch_size=2", 48.0, None, (4.0,))
    assert load.best["run_id"] == "r5" and load.slo == {"ttft_ms": 500.0}
    assert load.headline(one).startswith("max_batch_size=1: **4 req/s** is the highest offered rate that held")
    assert "; 16 req/s did not, with SLO attainment 80.0%" in load.headline(one)
    assert "it held at every rate tried, so the capacity is higher" in load.headline(two)
    assert "Lower rates did not hold either (4 req/s)" in load.headline(two)
    # a lower target lets the dip hold
    assert analyse(runs, swept, 95.0, "asked for").capacities[1].dips == ()
    # an engine that fell behind at its highest held rate has not shown that it sustains it
    behind = analyse(runs.assign(**{"tags.saturated": ["False"] * 5 + ["True"]}), swept, 99.0, "the default")
    assert "At 48 req/s the engine fell behind" in behind.headline(behind.capacities[1])
    assert "the capacity is higher" not in behind.headline(behind.capacities[1])
    # without an SLO a rate holds when the engine kept up with it
    no_slo = runs.assign(**{"params.slo.ttft_ms": "None", "tags.saturated": ["False", "True", "True"] * 2})
    unbounded = analyse(no_slo, swept, 99.0, "the default")
    assert unbounded.criterion == "saturation" and [c.held_rate for c in unbounded.capacities] == [4.0, 4.0]
    assert unbounded.headline(unbounded.capacities[0]).startswith(
        "max_batch_size=1: **4 req/s** is the highest offered rate that the engine kept up with"
    )


@pytest.fixture(scope="module")
def goodput_store(tmp_path_factory):
    """search=goodput under a TTFT constraint: two distinct points of its space (the grid sampler, without the
    warm start, repeats none)."""
    work = tmp_path_factory.mktemp("goodput")
    search = run_sweep(
        work,
        "-m",
        "search=goodput",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.warm_start=false",
        "hydra.sweeper.n_trials=2",
        *LOAD_QUICK,
        "workload.request_rate=2",
        "+hydra.sweeper.constraints.ttft_ms_p99='<=100000'",
    )
    assert search.returncode == 0, search.stderr[-3000:]
    return work, search.stdout, mlflow_runs(work)


def test_a_goodput_search_report_leads_with_goodput_and_its_constraint(goodput_store):
    work, stdout, runs = goodput_store
    text, out = sweep_report(stdout)
    assert "- **objective**: goodput (req/s), higher is better (from the sweep's search)" in text
    assert "- **constraints**: TTFT P99 (ms) <= 100000 (from the sweep's search)" in text
    assert "- **SLO** (interactive): TTFT <= 500 ms, TPOT <= 50 ms" in text
    assert "Best first by goodput (higher is better, runs that break a constraint last)" in text

    table = pd.read_csv(out / "comparison.csv")
    assert list(table.columns[2:5]) == ["goodput (req/s)", "TTFT P99 (ms)", "SLO attainment (%)"]
    goodput = list(table["goodput (req/s)"])
    assert len(goodput) == 2 and goodput == sorted(goodput, reverse=True)
    listed = pd.read_csv(out / "runs.csv")
    settings = ["engine.attn_implementation", "engine.max_batch_size"]
    swept = [c for c in settings if listed[c].nunique() > 1]
    assert list(listed.columns[2 + len(swept) : 4 + len(swept)]) == ["goodput_req_s", "ttft_ms_p99"]
    # the plots are of the objective
    assert swept and all((out / f"goodput_vs_{c.replace('.', '_')}.png").is_file() for c in swept)
    assert not list(out.glob("throughput_vs_*")) and (out / "pareto_front.png").is_file()


def test_a_report_ranks_by_the_objective_asked_for(goodput_store, tmp_path):
    from sweep.report import build_report

    work, _, runs = goodput_store
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    report = build_report(uri, "sweep", tmp_path, parent_id=parent.info.run_id, objective="ttft_ms_p99")
    assert report.goal.objective.direction == "minimize" and report.goal.source == "asked for"
    assert [o.metric for o in report.goal.objectives] == ["ttft_ms_p99", "goodput_req_s"]
    ttft = list(report.runs["metrics.ttft_ms_p99"])
    assert ttft == sorted(ttft)
    assert list(pd.read_csv(tmp_path / "comparison.csv").columns[2:4]) == ["TTFT P99 (ms)", "goodput (req/s)"]
    assert (tmp_path / "ttft_p99_vs_engine_max_batch_size.png").is_file() or (
        tmp_path / "ttft_p99_vs_engine_attn_implementation.png"
    ).is_file()
