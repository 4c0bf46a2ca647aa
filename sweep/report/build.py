"""Comparison report from recorded runs: `python -m sweep.report`.

Reads runs from MLflow into pandas (the children of a sweep's parent run, a study's trials, or any runs by id)
and writes a report to paste into a PR: `comparison.md` (what was compared, then the seed's table for every run,
best first, against a baseline), `comparison.csv` (that table), `runs.csv` (every run's settings and main
figures) and PNG plots, one function each: throughput against each swept option, latency percentiles per run,
and the throughput/latency Pareto front. With a parent run, the files are logged to it under report/.

    python -m sweep.report                       # the latest sweep in the default store
    python -m sweep.report --study throughput-tiny-hf
    python -m sweep.report --runs ID1,ID2,ID3 --baseline ID1
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sweep.measure.figures import HEADLINE, label, lookup
from trackers.store import owner_alive

log = logging.getLogger("sweep.report")

OBJECTIVE = "output_throughput_tok_s"
LATENCY_PERCENTILES = ("p50", "p90", "p95", "p99")
# runs.csv beside the swept settings, in this order; the rest stays in MLflow (and results.json of each run).
RUN_FIGURES = (
    *HEADLINE,
    "output_throughput_tok_s_min",
    "output_throughput_tok_s_max",
    "ttft_ms_p99",
    "tpot_ms_p99",
    "itl_ms_p50",
    "request_throughput_req_s",
    "gpu_util_pct_mean",
    "host_peak_rss_gb",
    "build_time_s",
    "roofline_efficiency",
)
RUN_TAGS = ("backend", "model", "device", "gpu", "scenario", "engine.cache_hit", "figures.unsteady")
# Params that are bookkeeping, not settings a user compares.
NOT_SETTINGS = ("params.tracker.", "params.sweep.", "params.engine.ignored_options", "params.cache_dir")
CONTEXT_PARAMS = {
    "model": "params.model.name",
    "backend": "params.backend.name",
    "device": "tags.device",
    "dtype": "tags.dtype",
    "scenario": "params.workload.scenario",
    "requests": "params.workload.num_requests",
    "input / output tokens": ("params.workload.input_len", "params.workload.output_len"),
    "iterations": "params.workload.iterations",
}
SIGNIFICANT = 4  # digits kept in the CSV files


class ReportError(ValueError):
    pass


@dataclass
class Report:
    runs: pd.DataFrame  # finished runs with figures, best first
    baseline: pd.Series
    best: pd.Series
    swept: list[str]  # params.* columns that differ between the runs
    objective: str
    selection: str  # what was asked for, in words
    counts: dict[str, int]  # runs of the selection by status
    files: dict[str, Path] = field(default_factory=dict)


# -- selecting the runs ---------------------------------------------------------------------------------------
def selection_filter(run_ids: list[str] | None, study: str | None, parent_id: str | None) -> str:
    if run_ids:
        return "attributes.run_id IN ({})".format(", ".join(f"'{rid}'" for rid in run_ids))
    if study:  # every trial of the study, across the parent runs of each (resumed) invocation
        return f"tags.optuna_study = '{study}'"
    return f"tags.`mlflow.parentRunId` = '{parent_id}'"


def load_runs(uri: str, experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    """Every run of the selection, whatever its status: metrics.*, params.* and tags.* columns."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, max_results=10000)


def finished_with_figures(runs: pd.DataFrame, run_ids: list[str] | None) -> pd.DataFrame:
    if run_ids:
        missing = sorted(set(run_ids) - set(runs.get("run_id", [])))
        if missing:
            raise ReportError(f"--runs: no run {', '.join(missing)} in this experiment")
    if runs.empty or f"metrics.{OBJECTIVE}" not in runs:
        raise ReportError("no finished runs with figures found for this selection")
    done = runs[(runs["status"] == "FINISHED") & runs[f"metrics.{OBJECTIVE}"].notna()]
    if done.empty:
        raise ReportError("no finished runs with figures found for this selection")
    return blank_ignored_options(done.reset_index(drop=True))


def blank_ignored_options(runs: pd.DataFrame) -> pd.DataFrame:
    """An engine option a run's backend ignores is no setting of that run (hf has no cuda_graphs): blank it, so
    that runs of different backends differ only in what each honours."""
    runs = runs.copy()
    for i, ignored in runs.get("params.engine.ignored_options", pd.Series(dtype=str)).items():
        for option in str(ignored).split(","):
            if f"params.engine.{option}" in runs:
                runs.loc[i, f"params.engine.{option}"] = None
    return runs


def find_parent(client, experiment_ids: list[str], study: str | None) -> str:
    filter_string = "tags.`sweep.kind` != ''" + (f" and tags.`optuna.study` = '{study}'" if study else "")
    parents = client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time DESC"], max_results=50)
    # A dead sweep (killed, or RUNNING while its process is gone) is not the latest sweep worth reporting.
    alive = [
        r for r in parents if r.info.status != "KILLED" and (r.info.status != "RUNNING" or owner_alive(r.data.tags))
    ]
    if not alive:
        raise ReportError(f"no sweep found{f' for study {study!r}' if study else ''}")
    return alive[0].info.run_id


def pick_baseline(runs: pd.DataFrame, baseline_id: str | None) -> pd.Series:
    if baseline_id:
        match = runs[runs["run_id"] == baseline_id]
        if match.empty:
            raise ReportError(f"--baseline {baseline_id} is not among the selected finished runs")
        return match.iloc[0]
    if "tags.backend" in runs and (runs["tags.backend"] == "hf").any() and (runs["tags.backend"] != "hf").any():
        return runs[runs["tags.backend"] == "hf"].sort_values("start_time").iloc[0]  # eager transformers: the seed's
    return runs.sort_values("start_time").iloc[0]


def best_first(runs: pd.DataFrame, objective: str, direction: str) -> pd.DataFrame:
    return runs.sort_values(f"metrics.{objective}", ascending=direction == "minimize").reset_index(drop=True)


def swept_params(runs: pd.DataFrame) -> list[str]:
    """The settings that differ between the runs: model and backend first, then by name."""
    swept = sorted(
        c
        for c in runs.columns
        if c.startswith("params.") and not c.startswith(NOT_SETTINGS) and runs[c].nunique(dropna=True) > 1
    )
    first = [c for c in ("params.model.name", "params.backend.name") if c in swept]
    return first + [c for c in swept if c not in first]


# -- labels and numbers ---------------------------------------------------------------------------------------
def short(param: str) -> str:
    """params.engine.max_batch_size -> max_batch_size."""
    return param.rsplit(".", 1)[-1]


def settings_text(row: pd.Series, swept: list[str]) -> str:
    """`compiled, max_batch_size=8`: what sets this run apart from the others of the report."""
    parts = []
    for param in swept:
        value = row.get(param)
        if isinstance(value, str) and value:
            parts.append(value if param == "params.backend.name" else f"{short(param)}={value}")
    return ", ".join(parts)


def run_label(row: pd.Series, swept: list[str]) -> str:
    return settings_text(row, swept) or str(row.get("tags.mlflow.runName") or row["run_id"][:8])


def fmt(value: float) -> str:
    """A figure as a person reads it: 3 significant digits up to 999, whole numbers beyond."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"


def round_sig(value: object, digits: int = SIGNIFICANT) -> object:
    if not isinstance(value, float) or math.isnan(value) or value == 0 or value.is_integer():
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


# -- tables ---------------------------------------------------------------------------------------------------
def comparison_table(report: Report) -> pd.DataFrame:
    """The seed's table for every run, best first: headline figures, then speedup over the baseline."""
    rows = []
    objective_col = f"metrics.{report.objective}"
    higher = lookup(report.objective).better == "higher"
    base = report.baseline[objective_col]
    for _, run in report.runs.iterrows():
        row = {"run": run_label(run, report.swept), "run_id": run["run_id"]}
        for metric in HEADLINE:
            row[label(metric)] = run.get(f"metrics.{metric}", float("nan"))
        value = run[objective_col]
        row["speedup"] = (value / base if higher else base / value) if base and value else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna(axis="columns", how="all")  # e.g. GPU memory of CPU runs: absent, never 0


def markdown_table(table: pd.DataFrame, report: Report) -> list[str]:
    figures = [c for c in table.columns if c not in ("run", "run_id")]
    unsteady = set(unsteady_runs(report.runs)["run_id"])
    lines = ["| run | " + " | ".join(figures) + " |", "| --- |" + " ---: |" * len(figures)]
    for _, row in table.iterrows():
        marks = []
        if row["run_id"] == report.best["run_id"]:
            marks.append("**best**")
        if row["run_id"] == report.baseline["run_id"]:
            marks.append("baseline")
        if row["run_id"] in unsteady:
            marks.append("unsteady")
        name = row["run"] + (f" ({', '.join(marks)})" if marks else "")
        cells = [f"{row[c]:.2f}×" if c == "speedup" and not math.isnan(row[c]) else fmt(row[c]) for c in figures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def context_lines(report: Report) -> list[str]:
    """What was compared, on what, and when: the header a reader needs before the numbers."""
    runs = report.runs

    def values(col: str) -> str:
        found = sorted({str(v) for v in runs.get(col, pd.Series(dtype=str)).dropna() if str(v)})
        return ", ".join(found) or "-"

    lines = [f"- **selection**: {report.selection}: {len(runs)} runs with figures of {sum(report.counts.values())}"]
    failed = {status: n for status, n in report.counts.items() if status != "FINISHED" and n}
    if failed:
        lines[-1] += " (" + ", ".join(f"{n} {status.lower()}" for status, n in failed.items()) + ")"
    for name, col in CONTEXT_PARAMS.items():
        text = " / ".join(values(c) for c in col) if isinstance(col, tuple) else values(col)
        lines.append(f"- **{name}**: {text}")
    gpus = values("tags.gpu")
    if gpus not in ("-", "none"):
        lines.append(f"- **GPU**: {gpus}")
    start, end = runs["start_time"].min(), runs["start_time"].max()
    lines.append(f"- **date**: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    lines.append(f"- **swept**: {', '.join(p.removeprefix('params.') for p in report.swept) or '-'}")
    for role, run in (("baseline", report.baseline), ("best", report.best)):
        settings = settings_text(run, report.swept) or "-"
        lines.append(f"- **{role}**: {settings} (run {run['run_id']}, {run.get('tags.mlflow.runName', '')})")
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
    name = label(report.objective, with_unit=False)
    higher = lookup(report.objective).better == "higher"
    ratio = f"the run's {name} / the baseline's" if higher else f"the baseline's {name} / the run's"
    lines = [
        "# sweep comparison",
        "",
        *context_lines(report),
        "",
        f"Best first by {name} ({'higher' if higher else 'lower'} is better); speedup = {ratio}.",
        "",
        *markdown_table(table, report),
    ]
    return "\n".join(lines) + "\n"


def runs_csv(report: Report) -> pd.DataFrame:
    """One row per run, best first: id, name, swept settings, main figures, tags; rounded."""
    runs = report.runs
    columns = ["run_id", "tags.mlflow.runName", *report.swept]
    columns += [f"metrics.{m}" for m in RUN_FIGURES] + [f"tags.{t}" for t in RUN_TAGS] + ["start_time"]
    table = runs[[c for c in columns if c in runs]].copy()
    table = table.rename(columns=lambda c: c.replace("tags.mlflow.runName", "name").split(".", 1)[-1])
    return table.map(round_sig)


# -- plots: one function each ---------------------------------------------------------------------------------
def plot_throughput_against(runs: pd.DataFrame, param: str, swept: list[str], path: Path) -> Path:
    """Throughput against one swept option; numeric options spaced by value (log2 for sizes that double),
    coloured by the other swept options."""
    import matplotlib.pyplot as plt

    y = runs[f"metrics.{OBJECTIVE}"]
    numeric = pd.to_numeric(runs[param], errors="coerce")
    others = [p for p in swept if p != param]
    groups = runs[others].astype(str).agg(", ".join, axis=1) if others else pd.Series("", index=runs.index)
    fig, ax = plt.subplots(figsize=(7, 4))
    if numeric.notna().all():
        x = numeric
        if x.nunique() > 1 and ((x > 0) & (x % 1 == 0)).all() and all(int(v) & (int(v) - 1) == 0 for v in x):
            ax.set_xscale("log", base=2)  # sizes that double (batch sizes): equal steps for each doubling
        ax.set_xticks(sorted(x.unique()), [f"{v:g}" for v in sorted(x.unique())])
        ax.minorticks_off()
    else:
        order = sorted(runs[param].astype(str).unique())
        x = runs[param].astype(str).map(order.index)
        ax.set_xticks(range(len(order)), order)
    for group in sorted(groups.unique()):
        mask = groups == group
        legend = ", ".join(f"{short(p)}={v}" for p, v in zip(others, group.split(", "))) if others else None
        points = pd.DataFrame({"x": x[mask], "y": y[mask]}).sort_values("x")
        ax.plot(points["x"], points["y"], "o-" if others else "o", label=legend)
    ax.set(xlabel=param.removeprefix("params."), ylabel=label(OBJECTIVE), title=f"throughput against {short(param)}")
    ax.set_ylim(bottom=0)
    if others:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_latency_percentiles(runs: pd.DataFrame, labels: list[str], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    cols = [f"metrics.e2e_latency_ms_{p}" for p in LATENCY_PERCENTILES]
    if not all(c in runs for c in cols):
        return None
    fig, ax = plt.subplots(figsize=(max(7, len(runs) * 0.7), 4.5))
    width = 0.8 / len(cols)
    for i, (p, c) in enumerate(zip(LATENCY_PERCENTILES, cols)):
        ax.bar([x + i * width for x in range(len(runs))], runs[c], width, label=p.upper())
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(runs))], labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel=label("e2e_latency_ms"), title="latency percentiles per run")
    ax.legend()
    return _save(fig, path)


def plot_pareto_front(runs: pd.DataFrame, labels: list[str], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if "metrics.e2e_latency_ms_p99" not in runs:
        return None
    thr, lat = runs[f"metrics.{OBJECTIVE}"], runs["metrics.e2e_latency_ms_p99"]
    front = pareto_mask(thr, lat)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(lat[~front], thr[~front], color="grey", label="dominated")
    order = lat[front].sort_values().index
    ax.plot(lat[order], thr[order], "o-", color="tab:red", label="Pareto front")
    for i in order:
        ax.annotate(labels[i], (lat[i], thr[i]), fontsize="x-small", xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel=label("e2e_latency_ms_p99"), ylabel=label(OBJECTIVE), title="throughput against P99 latency")
    ax.legend()
    return _save(fig, path)


def pareto_mask(throughput: pd.Series, latency: pd.Series) -> pd.Series:
    """A run is on the front when no other run has higher throughput and lower latency at once."""
    return pd.Series(
        [
            not ((throughput >= t) & (latency <= lat) & ((throughput > t) | (latency < lat))).any()
            for t, lat in zip(throughput, latency)
        ],
        index=throughput.index,
    )


def write_plots(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    runs, swept = report.runs, report.swept
    labels = [run_label(r, swept) for _, r in runs.iterrows()]
    paths = [
        plot_throughput_against(
            runs, p, swept, out / f"throughput_vs_{p.removeprefix('params.').replace('.', '_')}.png"
        )
        for p in swept
        if runs[p].notna().all()
    ]
    paths.append(plot_latency_percentiles(runs, labels, out / "latency_percentiles.png"))
    paths.append(plot_pareto_front(runs, labels, out / "pareto_front.png"))
    paths.append(load_curve(runs, out))
    return [p for p in paths if p is not None]


SLO_TARGET_PCT = 99.0  # where the load curve marks the SLO as broken


def load_curve(runs: pd.DataFrame, out: Path) -> Path | None:
    """The latency-throughput curve of a load sweep (workload.request_rate varied): output throughput, TTFT P99
    and TPOT P99 against the offered rate, with the first rate whose SLO attainment fell below the target."""
    col = "params.workload.request_rate"
    if col not in runs or runs[col].nunique() < 2:
        return None
    import matplotlib.pyplot as plt

    data = runs.assign(rate=runs[col].astype(float)).sort_values("rate")
    panels = [m for m in ("output_throughput_tok_s", "ttft_ms_p99", "tpot_ms_p99") if f"metrics.{m}" in data]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    broken = None
    if "metrics.slo_attainment_pct" in data:
        below = data[data["metrics.slo_attainment_pct"] < SLO_TARGET_PCT]
        broken = below["rate"].min() if not below.empty else None
    for ax, metric in zip(axes[0], panels):
        ax.plot(data["rate"], data[f"metrics.{metric}"], "o-")
        ax.set(xlabel="offered rate (req/s)", ylabel=label(metric), title=label(metric, with_unit=False))
        if broken is not None:
            ax.axvline(broken, color="tab:red", linestyle="--", label=f"SLO attainment < {SLO_TARGET_PCT:g}%")
            ax.legend(fontsize=8)
    return _save(fig, out / "load_curve.png")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the report -----------------------------------------------------------------------------------------------
def build_report(
    uri: str,
    experiment: str,
    out: Path,
    parent_id: str | None = None,
    study: str | None = None,
    run_ids: list[str] | None = None,
    baseline_id: str | None = None,
    objective: str = OBJECTIVE,
    direction: str = "maximize",
) -> Report:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no experiment {experiment!r} in {uri}")
    if not run_ids and not parent_id:
        parent_id = find_parent(client, [exp.experiment_id], study)
    selected = load_runs(uri, [exp.experiment_id], selection_filter(run_ids, study, parent_id))
    runs = finished_with_figures(selected, run_ids)
    if f"metrics.{objective}" not in runs:
        raise ReportError(f"--objective {objective!r} was not recorded by these runs")
    runs = best_first(runs, objective, direction)
    selection = f"runs {', '.join(run_ids)}" if run_ids else f"study {study}" if study else f"sweep {parent_id}"
    report = Report(
        runs=runs,
        baseline=pick_baseline(runs, baseline_id),
        best=runs.iloc[0],
        swept=swept_params(runs),
        objective=objective,
        selection=selection,
        counts=selected["status"].value_counts().to_dict(),
    )
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(report)
    text = markdown(table, report)
    report.files = {name: out / name for name in ("comparison.md", "comparison.csv", "runs.csv")}
    report.files["comparison.md"].write_text(text)
    table.map(round_sig).to_csv(report.files["comparison.csv"], index=False)
    runs_csv(report).to_csv(report.files["runs.csv"], index=False)
    for path in write_plots(report, out):
        report.files[path.name] = path
    if parent_id:
        for path in report.files.values():
            client.log_artifact(parent_id, str(path), "report")
    print(text)
    return report


def main(argv: list[str] | None = None) -> int:
    from trackers.mlflow_tracker import default_uri

    parser = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)"
    )
    parser.add_argument("--experiment", default="sweep")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--parent", help="a sweep's parent run id")
    pick.add_argument("--study", help="the Optuna study name of a sweep")
    pick.add_argument("--runs", help="comma-separated run ids")
    parser.add_argument("--baseline", help="run id of the baseline (default: an hf run, else the first run)")
    parser.add_argument("--objective", default=OBJECTIVE, help="figure that picks the best run")
    parser.add_argument("--direction", default="maximize", choices=("maximize", "minimize"))
    parser.add_argument("--out", default="reports", help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = build_report(
            args.uri or default_uri(),
            args.experiment,
            Path(args.out),
            parent_id=args.parent,
            study=args.study,
            run_ids=[rid.strip() for rid in args.runs.split(",") if rid.strip()] if args.runs else None,
            baseline_id=args.baseline,
            objective=args.objective,
            direction=args.direction,
        )
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {Path(args.out).resolve()}: {', '.join(report.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
