"""Comparison report from recorded runs: `python -m sweep.report`.

Reads runs from MLflow into pandas (the children of a sweep's parent run, or any runs by id), and writes the
seed's comparison table (baseline against best) as Markdown and CSV, plus PNG plots: throughput against each
swept option, latency percentiles per run, and the throughput/latency Pareto front. With a parent run, the
files are logged to it under report/.

    python -m sweep.report                       # the latest sweep in the default store
    python -m sweep.report --study throughput-tiny-hf
    python -m sweep.report --runs ID1,ID2,ID3 --baseline ID1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from sweep.figures import label, lookup
from trackers.store import owner_alive

log = logging.getLogger("sweep.report")

# The seed's comparison table, plus memory and utilisation; labels, units and directions from sweep/figures.py.
COMPARISON = (
    "e2e_latency_ms_p50",
    "e2e_latency_ms_p99",
    "ttft_ms_p50",
    "tpot_ms_p50",
    "output_throughput_tok_s",
    "gpu_util_pct_mean",
    "gpu_peak_memory_gb",
    "host_peak_rss_gb",
)
LATENCY_PERCENTILES = ("p50", "p90", "p95", "p99")


class ReportError(ValueError):
    pass


def load_runs(client, experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    """Finished runs with figures, one row each: metrics.*, params.* and tags.* columns, as mlflow.search_runs gives."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, max_results=10000)
    if runs.empty or "metrics.output_throughput_tok_s" not in runs:
        raise ReportError("no finished runs with figures found for this selection")
    runs = runs[(runs["status"] == "FINISHED") & runs["metrics.output_throughput_tok_s"].notna()]
    return runs.sort_values("start_time").reset_index(drop=True)


def selection_filter(run_ids: list[str] | None, study: str | None, parent_id: str | None) -> str:
    if run_ids:
        return " OR ".join(f"attributes.run_id = '{rid}'" for rid in run_ids)
    if study:  # every trial of the study, across the parent runs of each (resumed) invocation
        return f"tags.optuna_study = '{study}'"
    return f"tags.`mlflow.parentRunId` = '{parent_id}'"


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
        return runs[runs["tags.backend"] == "hf"].iloc[0]  # eager transformers: the seed's baseline
    return runs.iloc[0]


def comparison_table(baseline: pd.Series, best: pd.Series) -> pd.DataFrame:
    rows = []
    for metric in COMPARISON:
        col = f"metrics.{metric}"
        if col not in baseline or pd.isna(baseline.get(col)) or pd.isna(best.get(col)):
            continue  # e.g. GPU figures of CPU runs: absent, never 0
        base, cand = float(baseline[col]), float(best[col])
        higher = lookup(metric).better == "higher"
        ratio = (cand / base if higher else base / cand) if base and cand else float("nan")
        rows.append({"figure": label(metric), "baseline": base, "best": cand, "speedup": ratio})
    return pd.DataFrame(rows)


def swept_params(runs: pd.DataFrame) -> list[str]:
    ignore = ("params.tracker.", "params.sweep.", "params.engine.ignored_options")
    return [
        c
        for c in runs.columns
        if c.startswith("params.") and not c.startswith(ignore) and runs[c].nunique(dropna=True) > 1
    ]


def pareto_mask(throughput: pd.Series, latency: pd.Series) -> pd.Series:
    """A run is on the front when no other run has higher throughput and lower latency at once."""
    return pd.Series(
        [
            not ((throughput >= t) & (latency <= lat) & ((throughput > t) | (latency < lat))).any()
            for t, lat in zip(throughput, latency)
        ],
        index=throughput.index,
    )


def run_label(row: pd.Series) -> str:
    name = row.get("tags.mlflow.runName") or row["run_id"][:8]
    trial = row.get("tags.optuna_trial")
    return f"trial {trial}" if isinstance(trial, str) and trial else str(name)


def write_plots(runs: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    thr = runs["metrics.output_throughput_tok_s"]
    for param in swept_params(runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        values = runs[param].astype(str)
        order = sorted(values.unique(), key=lambda v: (float(v) if _is_number(v) else float("inf"), v))
        ax.scatter([order.index(v) for v in values], thr)
        ax.set_xticks(range(len(order)), order)
        ax.set(
            xlabel=param.removeprefix("params."),
            ylabel=label("output_throughput_tok_s"),
            title=f"throughput vs {param.removeprefix('params.')}",
        )
        paths.append(_save(fig, out / f"throughput_vs_{param.removeprefix('params.').replace('.', '_')}.png"))

    cols = [f"metrics.e2e_latency_ms_{p}" for p in LATENCY_PERCENTILES]
    if all(c in runs for c in cols):
        fig, ax = plt.subplots(figsize=(max(7, len(runs) * 0.6), 4))
        width = 0.8 / len(cols)
        for i, (p, c) in enumerate(zip(LATENCY_PERCENTILES, cols)):
            ax.bar([x + i * width for x in range(len(runs))], runs[c], width, label=p.upper())
        ax.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(runs))],
            [run_label(r) for _, r in runs.iterrows()],
            rotation=45,
            ha="right",
        )
        ax.set(ylabel=label("e2e_latency_ms"), title="latency percentiles per run")
        ax.legend()
        paths.append(_save(fig, out / "latency_percentiles.png"))

    if "metrics.e2e_latency_ms_p99" in runs:
        lat = runs["metrics.e2e_latency_ms_p99"]
        front = pareto_mask(thr, lat)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.scatter(lat[~front], thr[~front], color="grey", label="dominated")
        order = lat[front].sort_values().index
        ax.plot(lat[order], thr[order], "o-", color="tab:red", label="Pareto front")
        ax.set(
            xlabel=label("e2e_latency_ms_p99"),
            ylabel=label("output_throughput_tok_s"),
            title="throughput against P99 latency",
        )
        ax.legend()
        paths.append(_save(fig, out / "pareto_front.png"))
    if (curve := load_curve(runs, out)) is not None:
        paths.append(curve)
    return paths


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


def markdown(table: pd.DataFrame, baseline: pd.Series, best: pd.Series) -> str:
    lines = [
        f"baseline: {run_label(baseline)} ({baseline['run_id']}), best: {run_label(best)} ({best['run_id']})",
        "",
        "| figure | baseline | best | speedup |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r.figure} | {r.baseline:.2f} | {r.best:.2f} | {r.speedup:.2f}× |" for r in table.itertuples()]
    return "\n".join(lines) + "\n"


def build_report(
    uri: str,
    experiment: str,
    out: Path,
    parent_id: str | None = None,
    study: str | None = None,
    run_ids: list[str] | None = None,
    baseline_id: str | None = None,
    objective: str = "output_throughput_tok_s",
    direction: str = "maximize",
) -> dict[str, Path]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no experiment {experiment!r} in {uri}")
    if not run_ids and not parent_id:
        parent_id = find_parent(client, [exp.experiment_id], study)
    runs = load_runs(client, [exp.experiment_id], selection_filter(run_ids, study, parent_id))
    col = f"metrics.{objective}"
    if col not in runs:
        raise ReportError(f"--objective {objective!r} was not recorded by these runs")
    baseline = pick_baseline(runs, baseline_id)
    best = runs.loc[runs[col].idxmax() if direction == "maximize" else runs[col].idxmin()]
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(baseline, best)
    files = {
        "comparison.md": out / "comparison.md",
        "comparison.csv": out / "comparison.csv",
        "runs.csv": out / "runs.csv",
    }
    files["comparison.md"].write_text(markdown(table, baseline, best))
    table.to_csv(files["comparison.csv"], index=False)
    runs.to_csv(files["runs.csv"], index=False)
    for path in write_plots(runs, out):
        files[path.name] = path
    if parent_id:
        for path in files.values():
            client.log_artifact(parent_id, str(path), "report")
    print(markdown(table, baseline, best))
    return files


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
    parser.add_argument("--objective", default="output_throughput_tok_s", help="figure that picks the best run")
    parser.add_argument("--direction", default="maximize", choices=("maximize", "minimize"))
    parser.add_argument("--out", default="reports", help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = build_report(
            args.uri or default_uri(),
            args.experiment,
            Path(args.out),
            parent_id=args.parent,
            study=args.study,
            run_ids=args.runs.split(",") if args.runs else None,
            baseline_id=args.baseline,
            objective=args.objective,
            direction=args.direction,
        )
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {p}" for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
