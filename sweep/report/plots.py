"""The report's plots, one function each, every one of the report's objective: the objective against each swept
setting, latency percentiles per run, the Pareto front of the objective against its trade-off, and a load sweep's
load curve (sweep/report/load_plots.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sweep.measure.figures import label, lookup
from sweep.report.labels import run_label, short
from sweep.report.load import RATE
from sweep.report.load_plots import load_curve, save
from sweep.report.objective import Objective
from sweep.report.selection import Report

LATENCY_PERCENTILES = ("p50", "p90", "p95", "p99")
# What a single objective trades against on the Pareto plot: a rate or throughput against the tail latency it
# costs, a latency or cost against the throughput it buys.
TRADE_OFF = {
    True: Objective("e2e_latency_ms_p99", "minimize"),
    False: Objective("output_throughput_tok_s", "maximize"),
}


def plot_name(metric: str) -> str:
    """A file name's stem for a figure: its name without the unit (and `output_`, the default sense of a
    throughput): output_throughput_tok_s -> throughput, ttft_ms_p99 -> ttft_p99, goodput_req_s -> goodput."""
    figure = lookup(metric)
    stem = figure.name
    unit = "_" + figure.unit.lower().replace("/", "_").replace("%", "pct")
    if figure.unit and stem.endswith(unit):
        stem = stem.removesuffix(unit)
    return stem.removeprefix("output_") + metric.removeprefix(figure.name)


def plot_objective_against(runs: pd.DataFrame, param: str, swept: list[str], objective: Objective, path: Path) -> Path:
    """The objective against one swept setting; numeric settings spaced by value (log2 for sizes that double), a
    line for each value of the other swept settings."""
    import matplotlib.pyplot as plt

    y = runs[objective.column]
    numeric = pd.to_numeric(runs[param], errors="coerce")
    others = [p for p in swept if p != param]
    groups = runs[others].astype(str).agg(", ".join, axis=1) if others else pd.Series("", index=runs.index)
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    better = "higher" if objective.higher else "lower"
    ax.set(
        xlabel=param.removeprefix("params."),
        ylabel=label(objective.metric),
        title=f"{label(objective.metric, with_unit=False)} against {short(param)} ({better} is better)",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize="small", title="other settings", title_fontsize="small")
    return save(fig, path)


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
    ax.set(xlabel="run", ylabel=label("e2e_latency_ms"), title="E2E latency percentiles per run (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="percentile", fontsize="small")
    return save(fig, path)


def plot_pareto_front(runs: pd.DataFrame, labels: list[str], y: Objective, x: Objective, path: Path) -> Path | None:
    """The objective (y) against what it trades with (x); the runs no other run beats on both are the front."""
    import matplotlib.pyplot as plt

    if x.column not in runs or runs[x.column].isna().any():
        return None
    ys, xs = runs[y.column], runs[x.column]
    front = pareto_mask(ys, xs, y.higher, x.higher)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs[~front], ys[~front], color="grey", label="dominated")
    order = xs[front].sort_values().index
    ax.plot(xs[order], ys[order], "o-", color="tab:red", label="Pareto front")
    for i in order:
        ax.annotate(labels[i], (xs[i], ys[i]), fontsize="x-small", xytext=(4, 4), textcoords="offset points")
    better = f"{'higher' if y.higher else 'lower'} and {'right' if x.higher else 'left'} is better"
    title = f"{label(y.metric, with_unit=False)} against {label(x.metric, with_unit=False)} ({better})"
    ax.set(xlabel=label(x.metric), ylabel=label(y.metric), title=title)
    ax.set_xlim(0, xs.max() * 1.25 or None)  # room for the labels of the rightmost points
    ax.set_ylim(0, ys.max() * 1.1 or None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def pareto_mask(a: pd.Series, b: pd.Series, a_higher: bool, b_higher: bool) -> pd.Series:
    """A run is on the front when no other run is at least as good on both figures and better on one."""
    sa, sb = (1 if a_higher else -1), (1 if b_higher else -1)
    ga, gb = a * sa, b * sb  # larger is better on both
    return pd.Series(
        [not ((ga >= va) & (gb >= vb) & ((ga > va) | (gb > vb))).any() for va, vb in zip(ga, gb)], index=a.index
    )


def write_plots(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    runs, swept, goal = report.runs, report.swept, report.goal
    objective = goal.objective
    labels = [run_label(r, swept) for _, r in runs.iterrows()]
    stem = plot_name(objective.metric)
    against = [p for p in swept if runs[p].notna().all() and not (report.load is not None and p == RATE)]
    paths = [
        plot_objective_against(
            runs, p, swept, objective, out / f"{stem}_vs_{p.removeprefix('params.').replace('.', '_')}.png"
        )
        for p in against
    ]
    paths.append(plot_latency_percentiles(runs, labels, out / "latency_percentiles.png"))
    trade_off = goal.objectives[1] if len(goal.objectives) > 1 else TRADE_OFF[objective.higher]
    if trade_off.metric != objective.metric:
        paths.append(plot_pareto_front(runs, labels, objective, trade_off, out / "pareto_front.png"))
    if report.load is not None:
        paths.append(load_curve(report.load, objective, out / "load_curve.png"))
    return [p for p in paths if p is not None]
