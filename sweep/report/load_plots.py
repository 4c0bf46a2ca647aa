"""A load sweep's load curve: against the offered request rate (log axis), the P99 latencies the SLO bounds with
its thresholds, SLO attainment with its target, goodput and the achieved rate beside the offered one, and the
report's objective; the highest rate that held the SLO is marked on every panel."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from sweep.measure.figures import label, lookup
from sweep.report.load import ATTAINMENT, SLO_FIGURES, LoadSweep
from sweep.report.objective import Objective

LATENCY_STYLES = {"ttft_ms": "-", "tpot_ms": "--", "e2e_ms": ":"}
LATENCY_MARKERS = {"ttft_ms": "o", "tpot_ms": "^", "e2e_ms": "s"}
THRESHOLD = "tab:red"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: list[tuple[str, str, str, str]]  # (metric, legend name, line style, marker) drawn for each set-up
    lines: Callable[[object, list[float]], None]  # what is drawn once: thresholds, the target, the diagonal


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def panels(load: LoadSweep, objective: Objective) -> list[Panel]:
    keys = [key for key in SLO_FIGURES if key in load.slo] or ["ttft_ms", "tpot_ms"]

    def slo_lines(ax, rates):
        for key, bound in load.slo.items():
            name = lookup(SLO_FIGURES[key]).label
            ax.axhline(bound, color=THRESHOLD, linestyle=LATENCY_STYLES[key], label=f"SLO: {name} <= {bound:g} ms")

    def target_line(ax, rates):
        ax.axhline(load.target_pct, color=THRESHOLD, linestyle="--", label=f"target {load.target_pct:g}%")
        ax.set_ylim(top=105)

    def offered_line(ax, rates):
        ax.plot(rates, rates, color="grey", linewidth=0.8, label="offered")

    found = [
        Panel(
            "P99 latency (lower is better)",
            "latency P99 (ms)",
            [
                (SLO_FIGURES[k], label(SLO_FIGURES[k], with_unit=False), LATENCY_STYLES[k], LATENCY_MARKERS[k])
                for k in keys
            ],
            slo_lines,
        )
    ]
    if load.criterion == "slo":
        found.append(
            Panel(
                "SLO attainment (higher is better)",
                label(ATTAINMENT),
                [(ATTAINMENT, "attainment", "-", "o")],
                target_line,
            )
        )
    served = [("achieved_rate_req_s", "achieved", "--", "s")]
    if load.criterion == "slo":
        served.insert(0, ("goodput_req_s", "goodput", "-", "o"))
    found.append(
        Panel("goodput and achieved rate (higher is better)", "requests per second (req/s)", served, offered_line)
    )
    drawn = {series[0] for panel in found for series in panel.series}
    if objective.metric not in drawn:
        name = label(objective.metric, with_unit=False)
        better = "higher" if objective.higher else "lower"
        found.append(
            Panel(
                f"{name} ({better} is better)",
                label(objective.metric),
                [(objective.metric, name, "-", "o")],
                lambda ax, rates: None,
            )
        )
    return found


def load_curve(load: LoadSweep, objective: Objective, path: Path) -> Path | None:
    """The load curve as one PNG; None when fewer than two finite rates were offered."""
    fig = load_curve_figure(load, objective)
    return None if fig is None else save(fig, path)


def load_curve_figure(load: LoadSweep, objective: Objective):
    """The load curve's panels side by side (four as a square), or None without two finite rates to draw."""
    import matplotlib.pyplot as plt

    finite = [c.runs[c.runs["rate"].map(lambda r: 0 < r < math.inf)] for c in load.capacities]
    rates = sorted({r for runs in finite for r in runs["rate"]})
    if len(rates) < 2:
        return None
    chosen = panels(load, objective)
    columns = 2 if len(chosen) == 4 else len(chosen)  # four panels read best as a square
    rows = len(chosen) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 4.4 * rows + 0.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, chosen):
        for i, (capacity, runs) in enumerate(zip(load.capacities, finite)):
            color = colors[i % len(colors)]
            draw_series(ax, panel, runs, capacity.group, color)
            if capacity.held_rate is not None and 0 < capacity.held_rate < math.inf:
                ax.axvline(capacity.held_rate, color=color, linestyle=(0, (1, 3)), linewidth=1.2)
        panel.lines(ax, rates)
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.minorticks_off()
        ax.set(xlabel="offered request rate (req/s)", ylabel=panel.ylabel, title=panel.title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"load curve: a rate holds when {load.slo_text()}; dotted: the highest that held", fontsize="medium")
    return fig


def draw_series(ax, panel: Panel, runs: pd.DataFrame, group: str, color: str) -> None:
    for metric, name, style, marker in panel.series:
        if f"metrics.{metric}" in runs and runs[f"metrics.{metric}"].notna().any():
            legend = f"{name}, {group}" if group else name
            ax.plot(runs["rate"], runs[f"metrics.{metric}"], marker=marker, linestyle=style, color=color, label=legend)
