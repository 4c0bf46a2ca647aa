"""Load sweeps: runs that offer one engine set-up a range of request rates (workload.request_rate swept in the rate
scenario, a grid or the max-rate search). What a reader wants of one is the highest rate that held the SLO, per
set-up; a rate holds it when its SLO attainment reaches the target (99% unless the sweep or the caller says
otherwise). Without an SLO, a rate holds when the engine kept up with it (the run's `saturated` tag is false)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sweep.config.schema import SLO_KEYS
from sweep.measure.figures import lookup
from sweep.report.errors import ReportError
from sweep.report.labels import fmt, number, settings_text
from sweep.report.objective import Goal

RATE = "params.workload.request_rate"
ATTAINMENT = "slo_attainment_pct"
DEFAULT_TARGET_PCT = 99.0
# The figure each per-request SLO bounds, at the percentile the load curve draws it on.
SLO_FIGURES = {"ttft_ms": "ttft_ms_p99", "tpot_ms": "tpot_ms_p99", "e2e_ms": "e2e_latency_ms_p99"}


@dataclass(frozen=True)
class Capacity:
    """One set-up's outcome across the rates offered to it."""

    group: str  # the other swept settings ("" when only the rate varies)
    runs: pd.DataFrame  # its runs, rates ascending, with `rate` and `held` columns
    held_rate: float | None  # the highest rate that held
    broke_rate: float | None  # the lowest rate above held_rate that broke (the lowest tried, when none held)
    dips: tuple[float, ...]  # rates below held_rate that broke: attainment that is not monotonic in the rate

    @property
    def held_run(self) -> pd.Series | None:
        if self.held_rate is None:
            return None
        return self.runs[self.runs["rate"] == self.held_rate].iloc[-1]


@dataclass(frozen=True)
class LoadSweep:
    criterion: str  # "slo": SLO attainment >= target; "saturation": no SLO set, the engine kept up
    target_pct: float
    target_source: str
    slo: dict[str, float]  # the SLO the runs were held to, e.g. {"ttft_ms": 500, "tpot_ms": 50}
    slo_name: str
    others: list[str]  # the swept settings besides the rate
    capacities: list[Capacity]

    @property
    def runs(self) -> pd.DataFrame:
        """Every run, by set-up, rates ascending."""
        return pd.concat([c.runs for c in self.capacities], ignore_index=True)

    @property
    def best(self) -> pd.Series:
        """The run at the highest rate that held, over every set-up; when none held, the run nearest to holding
        (`held` False)."""
        held = [c for c in self.capacities if c.held_rate is not None]
        if held:
            return max(held, key=lambda c: c.held_rate).held_run
        runs = self.runs
        if self.criterion == "slo":
            return runs.sort_values([f"metrics.{ATTAINMENT}", "rate"], ascending=[False, True]).iloc[0]
        return runs.sort_values("rate").iloc[0]

    def slo_text(self) -> str:
        """`TTFT <= 500 ms, TPOT <= 50 ms in >= 99% of requests`; what a rate must hold."""
        if self.criterion == "saturation":
            return "the engine keeps up with the offered rate: no SLO is set, and the run is not tagged saturated"
        return f"{slo_bounds_text(self.slo)} in >= {self.target_pct:g}% of requests"

    def headline(self, capacity: Capacity) -> str:
        """One sentence: the highest rate that held, and what broke above it."""
        who = f"{capacity.group}: " if capacity.group else ""
        held = "held the SLO" if self.criterion == "slo" else "the engine kept up with"
        if capacity.held_rate is None:
            lowest = capacity.runs["rate"].min()
            return (
                f"{who}**no rate tried held** (a rate holds when {self.slo_text()}): even the lowest, "
                f"{rate_text(lowest)} req/s, had {self.outcome(capacity, lowest)}; sweep lower rates"
            )
        text = (
            f"{who}**{rate_text(capacity.held_rate)} req/s** is the highest offered rate that {held} (a rate holds when"
            f" {self.slo_text()}), with {self.outcome(capacity, capacity.held_rate)}"
        )
        top = capacity.held_run
        saturated = self.criterion == "slo" and top.get("tags.saturated") == "True"
        if capacity.broke_rate is not None:
            broke = capacity.broke_rate
            text += f"; {rate_text(broke)} req/s did not, with {self.outcome(capacity, broke)}"
        elif not saturated:
            text += "; it held at every rate tried, so the capacity is higher: sweep higher rates"
        if saturated:
            text += (
                f". At {rate_text(capacity.held_rate)} req/s the engine fell behind (it admitted"
                f" {fmt(top.get('metrics.achieved_rate_req_s'))} req/s, tagged saturated): its queue grows for as"
                " long as the load lasts, so a longer run breaks the SLO there; add requests (workload.num_requests)"
                " to find the rate it sustains"
            )
        if capacity.dips:
            dips = ", ".join(rate_text(r) for r in capacity.dips)
            text += f". Lower rates did not hold either ({dips} req/s): a busy machine or a marginal SLO; rerun them"
        return text

    def outcome(self, capacity: Capacity, rate: float) -> str:
        run = capacity.runs[capacity.runs["rate"] == rate].iloc[-1]
        if self.criterion == "slo":
            return f"SLO attainment {fmt(run[f'metrics.{ATTAINMENT}'])}%"
        return f"an achieved rate of {fmt(run.get('metrics.achieved_rate_req_s'))} req/s"


def slo_bounds_text(slo: dict[str, float]) -> str:
    """`TTFT <= 500 ms, TPOT <= 50 ms`: what a request must meet to be good."""
    return ", ".join(f"{lookup(SLO_FIGURES[key]).label} <= {value:g} ms" for key, value in slo.items())


def slo_of(runs: pd.DataFrame) -> dict[str, float]:
    """The SLO the runs were held to (`slo.ttft_ms` ...), from the first run; the keys that are set."""
    slo = {key: number(runs[f"params.slo.{key}"].iloc[0]) for key in SLO_KEYS if f"params.slo.{key}" in runs}
    return {key: value for key, value in slo.items() if value == value}  # NaN: not set


def rate_text(rate: float) -> str:
    """An offered rate as it was set: 4, 0.5, 48."""
    return f"{rate:g}"


def is_load_sweep(runs: pd.DataFrame, swept: list[str]) -> bool:
    """The offered request rate varies between the runs, in the rate scenario."""
    scenarios = runs.get("params.workload.scenario", pd.Series(dtype=str))
    return RATE in swept and bool((scenarios == "rate").all())


def slo_target(given: float | None, parent_params: dict[str, str], goal: Goal) -> tuple[float, str]:
    """The SLO attainment (%) a rate must reach, and where that number comes from."""
    if given is not None:
        if not 0 < given <= 100:
            raise ReportError(f"--slo-target={given!r} is not allowed; it is a percentage in (0, 100]")
        return given, "asked for"
    if "max_rate.attainment_pct" in parent_params:
        return float(parent_params["max_rate.attainment_pct"]), "the max-rate search's hydra.sweeper.attainment"
    for c in goal.constraints:
        if c.metric == ATTAINMENT and c.op == ">=":
            return c.bound, "the sweep's constraint"
    return DEFAULT_TARGET_PCT, "the default"


def analyse(runs: pd.DataFrame, swept: list[str], target_pct: float, target_source: str) -> LoadSweep:
    slo = slo_of(runs)
    names = runs.get("params.slo.name", pd.Series(dtype=str)).dropna().unique()
    criterion = (
        "slo"
        if slo and f"metrics.{ATTAINMENT}" in runs and runs[f"metrics.{ATTAINMENT}"].notna().all()
        else "saturation"
    )
    others = [p for p in swept if p != RATE]
    data = runs.assign(rate=runs[RATE].map(number))
    if criterion == "slo":
        data["held"] = data[f"metrics.{ATTAINMENT}"] >= target_pct
    else:
        data["held"] = data.get("tags.saturated", pd.Series("", index=data.index)).fillna("") == "False"
    data["group"] = [settings_text(row, others) for _, row in data.iterrows()]
    capacities = [capacity(group, rows) for group, rows in data.groupby("group", sort=True)]
    return LoadSweep(criterion, target_pct, target_source, slo, ", ".join(names), others, capacities)


def capacity(group: str, runs: pd.DataFrame) -> Capacity:
    runs = runs.sort_values("rate", kind="stable").reset_index(drop=True)
    held = runs[runs["held"]]["rate"]
    broke = runs[~runs["held"]]["rate"]
    if held.empty:
        return Capacity(group, runs, None, broke.min() if not broke.empty else None, ())
    top = held.max()
    above = broke[broke > top]
    return Capacity(group, runs, top, above.min() if not above.empty else None, tuple(broke[broke < top]))
