"""The report's tables: `comparison.md` (what was compared, then a row for every run), `comparison.csv` (that table)
and `runs.csv` (every run's settings and main figures). Each leads with the objective and the constraint figures of
its sweep; a load sweep's lead with the rate, SLO attainment, goodput, achieved rate and queue time instead, and
its markdown with the highest rate that held the SLO."""

from __future__ import annotations

import math

import pandas as pd

from sweep.measure.figures import HEADLINE, label
from sweep.report.labels import fmt, round_sig, run_label, settings_text
from sweep.report.load import ATTAINMENT, rate_text, slo_bounds_text, slo_of
from sweep.report.selection import Report

# The figures a load sweep is read by, before the sweep's objective.
LOAD_FIGURES = (
    "achieved_rate_req_s",
    ATTAINMENT,
    "goodput_req_s",
    "queue_ms_p99",
    "ttft_ms_p99",
    "tpot_ms_p99",
    "e2e_latency_ms_p99",
)
RATE_COLUMN = "request rate (req/s)"
HELD_COLUMN = "held"
SATURATED_COLUMN = "saturated"  # the run's tag: it admitted under 95% of the offered rate
# runs.csv beside the swept settings and the sweep's own figures, in this order; the rest stays in MLflow (and
# results.json of each run).
RUN_FIGURES = (
    *HEADLINE,
    "output_throughput_tok_s_min",
    "output_throughput_tok_s_max",
    "ttft_ms_p99",
    "tpot_ms_p99",
    "itl_ms_p50",
    "request_throughput_req_s",
    "offered_rate_req_s",
    "achieved_rate_req_s",
    "goodput_req_s",
    ATTAINMENT,
    "queue_ms_p99",
    "gpu_util_pct_mean",
    "host_peak_rss_gb",
    "build_time_s",
    "roofline_efficiency",
)
RUN_TAGS = ("backend", "model", "device", "gpu", "scenario", "saturated", "engine.cache_hit", "figures.unsteady")
CONTEXT_PARAMS = {
    "backend": "params.backend.name",
    "device": "tags.device",
    "dtype": "tags.dtype",
    "scenario": "params.workload.scenario",
    "requests": "params.workload.num_requests",
    "input / output tokens": ("params.workload.input_len", "params.workload.output_len"),
    "iterations": "params.workload.iterations",
}


def unique(metrics: list[str]) -> list[str]:
    return list(dict.fromkeys(metrics))


def table_figures(report: Report) -> list[str]:
    """The figure columns, in order: the sweep's objective and constraints lead (after a load sweep's own)."""
    lead = report.goal.metrics
    if report.load is not None:
        return unique([*LOAD_FIGURES, *lead, "output_throughput_tok_s"])
    slo = [ATTAINMENT] if f"metrics.{ATTAINMENT}" in report.runs else []  # goodput is read against it
    return unique([*lead, *slo, *HEADLINE])


def comparison_table(report: Report) -> pd.DataFrame:
    """A row for every run, in the report's order: its figures, then the speedup over the baseline (a load sweep:
    whether it held the SLO)."""
    rows = []
    objective = report.goal.objective
    base = report.baseline[objective.column] if report.baseline is not None else None
    for _, run in report.runs.iterrows():
        row = {"run": run_label(run, report.swept), "run_id": run["run_id"]}
        if report.load is not None:
            row[RATE_COLUMN] = run["rate"]
        for metric in table_figures(report):
            row[label(metric)] = run.get(f"metrics.{metric}", float("nan"))
        if report.load is not None:
            row[HELD_COLUMN] = bool(run["held"])
            if isinstance(run.get("tags.saturated"), str):
                row[SATURATED_COLUMN] = run["tags.saturated"] == "True"
        else:
            value = run[objective.column]
            ratio = (value / base if objective.higher else base / value) if base and value else float("nan")
            row["speedup"] = ratio
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna(axis="columns", how="all")  # e.g. GPU memory of CPU runs: absent, never 0


def markdown_table(table: pd.DataFrame, report: Report) -> list[str]:
    figures = [c for c in table.columns if c not in ("run", "run_id")]
    unsteady = set(unsteady_runs(report.runs)["run_id"])
    lines = ["| run | " + " | ".join(figures) + " |", "| --- |" + " ---: |" * len(figures)]
    highest = (
        {c.held_run["run_id"] for c in report.load.capacities if c.held_rate is not None} if report.load else set()
    )
    for (_, row), (_, run) in zip(table.iterrows(), report.runs.iterrows()):
        marks = []
        if row["run_id"] in highest:
            marks.append("**highest rate that held**")
        elif report.load is None and row["run_id"] == report.best["run_id"]:
            marks.append("**best**")
        if report.baseline is not None and row["run_id"] == report.baseline["run_id"]:
            marks.append("baseline")
        marks += [f"breaks {c.text()}" for c in report.goal.broken(run)]
        if row["run_id"] in unsteady:
            marks.append("unsteady")
        name = row["run"] + (f" ({', '.join(marks)})" if marks else "")
        cells = [cell(c, row[c]) for c in figures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def cell(column: str, value: object) -> str:
    if column == "speedup" and not math.isnan(value):
        return f"{value:.2f}×"
    if column == RATE_COLUMN:
        return rate_text(value)
    return fmt(value)


def values(runs: pd.DataFrame, col: str) -> str:
    found = sorted({str(v) for v in runs.get(col, pd.Series(dtype=str)).dropna() if str(v) and str(v) != "None"})
    return ", ".join(found) or "-"


def model_text(runs: pd.DataFrame) -> str:
    """The models that ran, by their runs' `model` tag (a checkpoint's directory name), with where each came from."""
    models = []
    name_col = "tags.model" if "tags.model" in runs else "params.model.name"
    for name, rows in runs.groupby(runs[name_col].fillna("-"), sort=True):
        run = rows.iloc[0]
        if str(run.get("params.model.path", "None")) not in ("None", "nan"):
            source = f"checkpoint {run['params.model.path']}"
        elif str(run.get("params.model.hub_id", "None")) not in ("None", "nan"):
            source = f"hub {run['params.model.hub_id']}@{run.get('params.model.revision', 'None')}"
        else:
            source = f"generated, seed {run.get('params.model.seed', '-')}"
        models.append(f"{name} ({source})")
    return ", ".join(models)


def goal_lines(report: Report) -> list[str]:
    goal = report.goal
    lines = [f"- **objective**: {goal.objective.text()} ({goal.source})"]
    lines += [f"- **further objective**: {o.text()} (from the sweep's search)" for o in goal.objectives[1:]]
    if goal.constraints:
        lines.append(f"- **constraints**: {'; '.join(c.text() for c in goal.constraints)} (from the sweep's search)")
    slo = slo_of(report.runs)
    if report.load is not None:
        load = report.load
        target = f"target {load.target_pct:g}% ({load.target_source})" if load.criterion == "slo" else "no SLO set"
        lines.append(f"- **a rate holds when**: {load.slo_text()}; {target}")
    elif slo:
        lines.append(f"- **SLO** ({values(report.runs, 'params.slo.name')}): {slo_bounds_text(slo)}")
    return lines


def context_lines(report: Report) -> list[str]:
    """What was compared, on what, and when: the header a reader needs before the numbers."""
    runs = report.runs
    lines = [f"- **selection**: {report.selection}: {len(runs)} runs with figures of {sum(report.counts.values())}"]
    failed = {status: n for status, n in report.counts.items() if status != "FINISHED" and n}
    if failed:
        lines[-1] += " (" + ", ".join(f"{n} {status.lower()}" for status, n in failed.items()) + ")"
    lines.append(f"- **model**: {model_text(runs)}")
    for name, col in CONTEXT_PARAMS.items():
        text = " / ".join(values(runs, c) for c in col) if isinstance(col, tuple) else values(runs, col)
        lines.append(f"- **{name}**: {text}")
    gpus = values(runs, "tags.gpu")
    if gpus not in ("-", "none"):
        lines.append(f"- **GPU**: {gpus}")
    start, end = runs["start_time"].min(), runs["start_time"].max()
    lines.append(f"- **date**: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    lines += goal_lines(report)
    lines.append(f"- **swept**: {', '.join(p.removeprefix('params.') for p in report.swept) or '-'}")
    if report.load is not None:
        roles = [("highest rate that held", report.best)] if report.best["held"] else []
    else:
        roles = [("baseline", report.baseline), ("best", report.best)]
    for role, run in roles:
        settings = settings_text(run, report.swept) or "-"
        lines.append(f"- **{role}**: {settings} (run {run['run_id']}, {run.get('tags.mlflow.runName', '')})")
    if report.goal.constraints and report.goal.broken(report.best):
        lines.append("- **warning**: no run met every constraint; the best is the best of those that broke them")
    unsteady = unsteady_runs(runs)
    if not unsteady.empty:
        lines.append(
            f"- **warning**: in {len(unsteady)} of {len(runs)} runs (marked unsteady) the iterations disagreed by more"
            " than the set spread: the machine was busy; rerun those before trusting them"
        )
    return lines


def unsteady_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs tagged figures.unsteady (sweep/measure/summary.py): their iterations disagreed."""
    if "tags.figures.unsteady" not in runs:
        return runs.iloc[0:0]
    return runs[runs["tags.figures.unsteady"].fillna("") != ""]


def markdown(table: pd.DataFrame, report: Report) -> str:
    objective = report.goal.objective
    name = label(objective.metric, with_unit=False)
    if report.load is not None:
        load = report.load
        head = ["# load sweep: the highest request rate that held the SLO", ""]
        head += (
            [f"- {load.headline(c)}" for c in load.capacities] if load.others else [load.headline(load.capacities[0])]
        )
        order = (
            f"By {', '.join(p.removeprefix('params.') for p in load.others)}, then rate ascending."
            if load.others
            else "Rates ascending."
        )
        order += " The rates are loads offered to one set-up, not rival set-ups: no run is a baseline for another."
    else:
        head = ["# sweep comparison"]
        ratio = f"the run's {name} / the baseline's" if objective.higher else f"the baseline's {name} / the run's"
        constrained = ", runs that break a constraint last" if report.goal.constraints else ""
        order = f"Best first by {name} ({'higher' if objective.higher else 'lower'} is better{constrained}); "
        order += f"speedup = {ratio}."
    lines = [*head, "", *context_lines(report), "", order, "", *markdown_table(table, report)]
    return "\n".join(lines) + "\n"


def runs_csv(report: Report) -> pd.DataFrame:
    """One row per run, in the report's order: id, name, swept settings, the figures of the comparison table,
    then the other main figures and tags; rounded."""
    runs = report.runs
    metrics = unique([*table_figures(report), *RUN_FIGURES])
    columns = ["run_id", "tags.mlflow.runName", *report.swept] + [f"metrics.{m}" for m in metrics]
    columns += [f"tags.{t}" for t in RUN_TAGS] + ["start_time"]
    table = runs[[c for c in columns if c in runs]].copy()
    table = table.rename(columns=lambda c: c.replace("tags.mlflow.runName", "name").split(".", 1)[-1])
    return table.map(round_sig)
