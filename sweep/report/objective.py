"""What a report ranks runs by and holds them to: the objective (metric + direction), and the constraints.

A report names its objective in this order: what its caller asks for (`--objective`), what the sweep's search
recorded on its parent run (the Optuna sweeper logs `optuna.objectives` and `optuna.constraints` there), what the
runs themselves were set to (`objective.metric`, `objective.direction`: every run records its config), and last
the config's default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import pandas as pd

from sweep.config.schema import DIRECTIONS, ObjectiveConfig
from sweep.measure.figures import label, metric_names, unknown_figure_message
from sweep.report.errors import ReportError

CONSTRAINT_RULE = re.compile(r"^\s*(<=|>=)\s*([-+0-9.eE]+|inf)\s*$")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize

    @property
    def higher(self) -> bool:
        return self.direction == "maximize"

    @property
    def column(self) -> str:
        return f"metrics.{self.metric}"

    def text(self) -> str:
        return f"{label(self.metric)}, {'higher' if self.higher else 'lower'} is better"


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # <= | >=
    bound: float

    @property
    def column(self) -> str:
        return f"metrics.{self.metric}"

    def holds(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def text(self) -> str:
        return f"{label(self.metric)} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Goal:
    objectives: tuple[Objective, ...]  # the first ranks the runs; the others are the sweep's further objectives
    constraints: tuple[Constraint, ...]
    source: str  # where the objective came from, in words

    @property
    def objective(self) -> Objective:
        return self.objectives[0]

    @property
    def metrics(self) -> list[str]:
        """The objectives', then the constraints' figures: the columns every table of the report leads with."""
        found: list[str] = []
        for metric in [o.metric for o in self.objectives] + [c.metric for c in self.constraints]:
            if metric not in found:
                found.append(metric)
        return found

    def feasible(self, runs: pd.DataFrame) -> pd.Series:
        """True for each run that meets every constraint (all, without constraints)."""
        ok = pd.Series(True, index=runs.index)
        for c in self.constraints:
            ok &= runs[c.column].map(c.holds) if c.column in runs else False
        return ok

    def broken(self, run: pd.Series) -> list[Constraint]:
        return [c for c in self.constraints if not c.holds(run.get(c.column))]


def make_objective(metric: str, direction: str | None, key: str) -> Objective:
    """An objective of a recorded figure; without a direction, the one the figure registry gives."""
    figure = metric_names().get(metric)
    if figure is None:
        raise ReportError(unknown_figure_message(key, metric))
    if direction is None:
        if not figure.better:
            raise ReportError(f"{key}={metric!r} has no better direction; give --direction maximize or minimize")
        direction = "maximize" if figure.better == "higher" else "minimize"
    if direction not in DIRECTIONS:
        raise ReportError(
            f"{key.replace('objective', 'direction')}={direction!r} is not allowed; use maximize or minimize"
        )
    return Objective(metric, direction)


def recorded_objectives(parent_params: dict[str, str]) -> list[Objective]:
    """The objectives a search optimised, as its parent run records them (`optuna.objectives`: figure -> direction)."""
    text = parent_params.get("optuna.objectives")
    if not text:
        return []
    return [make_objective(m, d, "optuna.objectives") for m, d in json.loads(text).items()]


def recorded_constraints(parent_params: dict[str, str]) -> list[Constraint]:
    """The constraints a search held its trials to (`optuna.constraints`: figure -> '<=2000')."""
    constraints = []
    for metric, rule in json.loads(parent_params.get("optuna.constraints") or "{}").items():
        match = CONSTRAINT_RULE.match(str(rule))
        if match is None:
            raise ReportError(f"the sweep's optuna.constraints.{metric}={rule!r} is not '<=value' or '>=value'")
        constraints.append(Constraint(metric, match.group(1), float(match.group(2))))
    return constraints


def runs_objective(runs: pd.DataFrame) -> Objective | None:
    """The objective every run was set to (objective.metric / objective.direction), when they agree."""
    metrics = runs.get("params.objective.metric", pd.Series(dtype=str)).dropna().unique()
    directions = runs.get("params.objective.direction", pd.Series(dtype=str)).dropna().unique()
    if len(metrics) != 1 or len(directions) > 1:
        return None
    return make_objective(metrics[0], directions[0] if len(directions) else None, "objective.metric")


def resolve_goal(
    runs: pd.DataFrame, parent_params: dict[str, str], metric: str | None = None, direction: str | None = None
) -> Goal:
    """The report's objectives and constraints (module docstring: which source wins)."""
    sweep_objectives = recorded_objectives(parent_params)
    constraints = tuple(recorded_constraints(parent_params))
    if direction and not metric:
        raise ReportError(f"--direction={direction!r} needs --objective: the figure it applies to")
    if sweep_objectives:
        recorded, source = sweep_objectives[0], "from the sweep's search"
    else:
        recorded, source = runs_objective(runs), "from the runs' objective.metric"
    if recorded is None:
        default = ObjectiveConfig()
        recorded, source = make_objective(default.metric, default.direction, "objective.metric"), "the default"
    first = recorded
    if metric:
        asked = make_objective(metric, direction, "--objective")
        first, source = (recorded, source) if asked == recorded else (asked, "asked for")
    others = tuple(o for o in sweep_objectives if o.metric != first.metric)
    return Goal((first, *others), constraints, source)
