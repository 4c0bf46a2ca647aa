"""The readable table printed at the end of a run: labels and units from the figure registry, under a header that
says what was measured (the engine, and the workload as it reached it)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from sweep.measure.figures import FIGURES, HEADLINE, label, metric_names
from sweep.workload.requests import Request

DISTRIBUTION_STATS = ("p50", "p90", "p95", "p99", "mean")
# Iterations of one run whose throughput differs by more than this share of the median were measured on a busy
# or unsteady machine: the run says so (summary line and the tag `figures.unsteady`).
UNSTEADY_SPREAD = 0.25
# Per-run figures worth a line at the end of a run, in this order; the rest stay in the tracker and results.json.
SCALAR_FIGURES = (
    "output_throughput_tok_s",
    "total_token_throughput_tok_s",
    "request_throughput_req_s",
    "offered_rate_req_s",
    "achieved_rate_req_s",
    "goodput_req_s",
    "goodput_tok_s",
    "slo_attainment_pct",
    "build_time_s",
    "compile_and_warmup_s",
    "gpu_util_pct_mean",
    "gpu_peak_memory_gb",
    "torch_max_allocated_gb",
    "energy_j",
    "tokens_per_j",
    "roofline_efficiency",
    "roofline_efficiency_all_weights",
    "quality_top1_agreement_pct",
    "quality_kl",
    "quality_kl_topk",
    "host_peak_rss_gb",
)


def number(value: float) -> str:
    """Two decimals, or three significant digits for a small figure that two decimals would show as 0.00."""
    return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"


def tokens(lengths: list[int]) -> str:
    """`32` when every request has that length, else the mean and range: `31.5 (8-64)`."""
    low, high = min(lengths), max(lengths)
    return f"{low}" if low == high else f"{statistics.mean(lengths):.1f} ({low}-{high})"


def arrivals(wcfg: Any, batch_size: int, figures: dict[str, float]) -> str:
    """How requests were offered, and what the engine made of it: the rate asked, offered and achieved."""
    if wcfg.scenario == "latency":
        return "latency: one client, one request at a time"
    if wcfg.scenario == "concurrency":
        served = f", {batch_size} served at once" if wcfg.concurrency > batch_size else ""
        return f"concurrency: {wcfg.concurrency} clients{served}"
    if wcfg.scenario == "throughput" or math.isinf(wcfg.request_rate):
        return f"{wcfg.scenario}: every request at t0, up to {batch_size} at once"
    line = f"rate: {wcfg.request_rate:g} req/s asked (burstiness {wcfg.burstiness:g})"
    if "offered_rate_req_s" in figures:
        line += f", {figures['offered_rate_req_s']:.2f} offered, {figures['achieved_rate_req_s']:.2f} achieved"
    return line


def workload_header(wcfg: Any, measured: list[Request], batch_size: int, figures: dict[str, float]) -> str:
    """`rate: 8 req/s asked, 9.21 offered, 7.90 achieved · ISL 32 / OSL 32 tokens · 16 requests x 3 iterations`."""
    lengths = f"ISL {tokens([r.input_len for r in measured])} / OSL {tokens([r.output_len for r in measured])} tokens"
    count = f"{len(measured)} requests x {wcfg.iterations} iterations"
    return " · ".join([arrivals(wcfg, batch_size, figures), lengths, count])


def figure_text(metric: str, value: float) -> str:
    """`TTFT P50 403 ms`: a figure's label, its value to 3 significant digits (integers whole) and its unit."""
    unit = metric_names()[metric].unit if metric in metric_names() else ""
    number = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{label(metric, with_unit=False)} {number} {unit}".rstrip()


def headline(figures: dict[str, float], first: str | None = None) -> str:
    """The headline figures a run recorded on one line, `first` (the objective) leading in bold."""
    names = [n for n in dict.fromkeys([first, *HEADLINE]) if n and n in figures]
    return " · ".join(f"**{figure_text(n, figures[n])}**" if n == first else figure_text(n, figures[n]) for n in names)


def summary_table(title: str, figures: dict[str, float]) -> str:
    """The figures under `title` (one line or several)."""
    by_name = {f.name: f for f in FIGURES}
    header = f"{'latency':<16}{'unit':<6}" + "".join(f"{s:>10}" for s in DISTRIBUTION_STATS) + f"{'n':>6}"
    titles = title.splitlines()
    lines = [*titles, header]
    for f in FIGURES:
        if f.distribution and figures.get(f"{f.name}_n"):
            stats = "".join(f"{figures[f'{f.name}_{s}']:>10.2f}" for s in DISTRIBUTION_STATS)
            lines.append(f"{f.label:<16}{f.unit:<6}{stats}{int(figures[f'{f.name}_n']):>6}")
    for name in SCALAR_FIGURES:
        if name in figures:  # absent figures (GPU ones on a CPU) are left out, never shown as 0
            f = by_name[name]
            spread = ""
            if f"{name}_min" in figures:
                spread = f"   (min {figures[f'{name}_min']:.2f}, max {figures[f'{name}_max']:.2f})"
            lines.append(f"{f.label:<24}{number(figures[name]):>12} {f.unit}{spread}")
    for name in unsteady_figures(figures)[:1]:  # the throughputs move together: the first one says it
        f = by_name[name]
        low, high, spread = figures[f"{name}_min"], figures[f"{name}_max"], iteration_spread(figures, name)
        lines.append(f"WARNING: {f.label} ranged {low:.2f}-{high:.2f} {f.unit} over the iterations,")
        lines.append(
            f"  {spread:.0%} of the median (limit {UNSTEADY_SPREAD:.0%}): a busy machine? rerun before trusting it"
        )
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *titles, rule, *lines[len(titles) :], rule])


def iteration_spread(figures: dict[str, float], name: str) -> float | None:
    """(max - min) / median of a per-iteration figure, or None without several iterations."""
    low, high, median = figures.get(f"{name}_min"), figures.get(f"{name}_max"), figures.get(name)
    if low is None or high is None or not median or figures.get("iterations", 0) < 2:
        return None
    return (high - low) / median


def unsteady_figures(figures: dict[str, float]) -> list[str]:
    """The per-iteration figures whose iterations disagree by more than UNSTEADY_SPREAD."""
    return [f.name for f in FIGURES if f.spread and (iteration_spread(figures, f.name) or 0.0) > UNSTEADY_SPREAD]
