"""The comparison report of recorded runs: select them, name the objective, rank them (or, for a load sweep, find
the highest rate that held the SLO), write the tables and plots, and log them to the sweep's parent run."""

from __future__ import annotations

from pathlib import Path

from sweep.report.errors import ReportError
from sweep.report.labels import round_sig
from sweep.report.load import analyse, is_load_sweep, slo_target
from sweep.report.objective import resolve_goal
from sweep.report.plots import write_plots
from sweep.report.selection import (
    Report,
    best_first,
    find_parent,
    finished_runs,
    load_runs,
    parent_params,
    pick_baseline,
    selection_filter,
    shared_parent,
    swept_params,
    with_objective,
)
from sweep.report.tables import comparison_table, markdown, runs_csv

FILES = ("comparison.md", "comparison.csv", "runs.csv")


def build_report(
    uri: str,
    experiment: str,
    out: Path,
    parent_id: str | None = None,
    study: str | None = None,
    run_ids: list[str] | None = None,
    baseline_id: str | None = None,
    objective: str | None = None,
    direction: str | None = None,
    slo_target_pct: float | None = None,
) -> Report:
    """Write the report into `out` and return it. The objective (metric and direction) is the sweep's own unless
    given (sweep/report/objective.py); a load sweep's SLO target is the sweep's, else 99%, unless given."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no experiment {experiment!r} in {uri}")
    if not run_ids and not parent_id:
        parent_id = find_parent(client, [exp.experiment_id], study)
    selected = load_runs(uri, [exp.experiment_id], selection_filter(run_ids, study, parent_id))
    runs = finished_runs(selected, run_ids)
    recorded = parent_params(client, parent_id or shared_parent(runs))
    goal = resolve_goal(runs, recorded, objective, direction)
    runs = with_objective(runs, goal)
    swept = swept_params(runs)
    selection = f"runs {', '.join(run_ids)}" if run_ids else f"study {study}" if study else f"sweep {parent_id}"
    counts = selected["status"].value_counts().to_dict()
    if is_load_sweep(runs, swept):
        load = analyse(runs, swept, *slo_target(slo_target_pct, recorded, goal))
        report = Report(load.runs, goal, None, load.best, swept, selection, counts, load)
    else:
        runs = best_first(runs, goal)
        report = Report(runs, goal, pick_baseline(runs, baseline_id), runs.iloc[0], swept, selection, counts)
    write_files(report, out)
    if parent_id:
        for path in report.files.values():
            client.log_artifact(parent_id, str(path), "report")
    print(report.files["comparison.md"].read_text())
    return report


def write_files(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(report)
    report.files = {name: out / name for name in FILES}
    report.files["comparison.md"].write_text(markdown(table, report))
    table.map(round_sig).to_csv(report.files["comparison.csv"], index=False)
    runs_csv(report).to_csv(report.files["runs.csv"], index=False)
    for path in write_plots(report, out):
        report.files[path.name] = path
