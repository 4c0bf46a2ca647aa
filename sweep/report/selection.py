"""Which runs a report compares, and their roles: read from MLflow into pandas (metrics.*, params.*, tags.*
columns), the finished ones with the objective's figure, ranked, with a baseline and the settings that differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sweep.report.errors import ReportError
from sweep.report.load import LoadSweep
from sweep.report.objective import Goal
from trackers.store import owner_alive

# Params that are bookkeeping, not settings a user compares.
NOT_SETTINGS = ("params.tracker.", "params.sweep.", "params.engine.ignored_options", "params.cache_dir")
FIRST_SETTINGS = ("params.model.name", "params.model.path", "params.backend.name")


@dataclass
class Report:
    runs: pd.DataFrame  # finished runs with figures: best first, or by set-up and rate for a load sweep
    goal: Goal
    baseline: pd.Series | None  # None for a load sweep: its rates are loads on one engine, not rivals
    best: pd.Series
    swept: list[str]  # params.* columns that differ between the runs
    selection: str  # what was asked for, in words
    counts: dict[str, int]  # runs of the selection by status
    load: LoadSweep | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def objective(self) -> str:
        """The metric that ranks the runs."""
        return self.goal.objective.metric


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


def shared_parent(runs: pd.DataFrame) -> str | None:
    """The parent run every selected run belongs to, if they share one (hand-picked runs of one sweep)."""
    parents = runs.get("tags.mlflow.parentRunId", pd.Series(dtype=str))
    found = parents.dropna().unique()
    return found[0] if len(found) == 1 and parents.notna().all() else None


def parent_params(client, parent_id: str | None) -> dict[str, str]:
    """What the sweep's parent recorded about itself: its objectives and constraints (optuna.*), its target
    (max_rate.*)."""
    return dict(client.get_run(parent_id).data.params) if parent_id else {}


def finished_runs(selected: pd.DataFrame, run_ids: list[str] | None) -> pd.DataFrame:
    if run_ids:
        missing = sorted(set(run_ids) - set(selected.get("run_id", [])))
        if missing:
            raise ReportError(f"--runs: no run {', '.join(missing)} in this experiment")
    done = selected[selected["status"] == "FINISHED"] if "status" in selected else selected
    if done.empty or not any(c.startswith("metrics.") for c in done.columns):
        raise ReportError("no finished runs with figures found for this selection")
    return blank_ignored_options(done.reset_index(drop=True))


def with_objective(runs: pd.DataFrame, goal: Goal) -> pd.DataFrame:
    """The runs that recorded the objective's figure."""
    objective = goal.objective
    if objective.column not in runs or runs[objective.column].isna().all():
        raise ReportError(f"the objective {objective.metric!r} ({goal.source}) was not recorded by these runs")
    return runs[runs[objective.column].notna()].reset_index(drop=True)


def blank_ignored_options(runs: pd.DataFrame) -> pd.DataFrame:
    """An engine option a run's backend ignores is no setting of that run (hf has no cuda_graphs): blank it, so
    that runs of different backends differ only in what each honours."""
    runs = runs.copy()
    for i, ignored in runs.get("params.engine.ignored_options", pd.Series(dtype=str)).items():
        for option in str(ignored).split(","):
            if f"params.engine.{option}" in runs:
                runs.loc[i, f"params.engine.{option}"] = None
    return runs


def pick_baseline(runs: pd.DataFrame, baseline_id: str | None) -> pd.Series:
    if baseline_id:
        match = runs[runs["run_id"] == baseline_id]
        if match.empty:
            raise ReportError(f"--baseline {baseline_id} is not among the selected finished runs")
        return match.iloc[0]
    if "tags.backend" in runs and (runs["tags.backend"] == "hf").any() and (runs["tags.backend"] != "hf").any():
        return runs[runs["tags.backend"] == "hf"].sort_values("start_time").iloc[0]  # eager transformers: the seed's
    return runs.sort_values("start_time").iloc[0]


def best_first(runs: pd.DataFrame, goal: Goal) -> pd.DataFrame:
    """Runs that meet every constraint first, each part ranked by the objective."""
    ranked = runs.assign(_feasible=goal.feasible(runs))
    ranked = ranked.sort_values(
        ["_feasible", goal.objective.column], ascending=[False, not goal.objective.higher], kind="stable"
    )
    return ranked.drop(columns="_feasible").reset_index(drop=True)


def swept_params(runs: pd.DataFrame) -> list[str]:
    """The settings that differ between the runs: model and backend first, then by name."""
    swept = sorted(
        c
        for c in runs.columns
        if c.startswith("params.") and not c.startswith(NOT_SETTINGS) and runs[c].nunique(dropna=True) > 1
    )
    first = [c for c in FIRST_SETTINGS if c in swept]
    return first + [c for c in swept if c not in first]
