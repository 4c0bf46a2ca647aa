"""One trial from ask to tell: its job's overrides, the trials that end before building (reused, pruned, failed in
their preparation), and telling Optuna a finished job's figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._prepare import SearchSettings
from hydra_plugins.sweep_optuna_sweeper._record import ParentRun, Progress
from hydra_plugins.sweep_optuna_sweeper._space import constraint_violation, override_value, overrides_for
from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def job_overrides(
    config: DictConfig, study: optuna.Study, s: SearchSettings, params: dict, tags: dict, name: str
) -> list[str]:
    """A trial's overrides: its point, its tags and run name, and a console that leaves the line to the sweeper."""
    extra = [f"+tracker.tags.{k}={v}" for k, v in {sweeper_api.STUDY_TAG: study.study_name, **tags}.items()]
    extra += [
        f"tracker.run_name={override_value(name)}",
        f"++hydra.job.env_set.{sweeper_api.SUMMARY_TO_LOG_ENV}=1",
        "++hydra.job.env_set.TQDM_DISABLE=1",  # no progress bars from the job: the console is the sweeper's
    ]
    if OmegaConf.select(config, "hydra.job_logging.handlers.console") is not None:
        extra.append("++hydra.job_logging.handlers.console.level=WARNING")  # full tables go to the job's log file
    return overrides_for(s.fixed, params, s.command_keys) + extra


def end_before_building(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    attr: str,
    why: str,
    parent: ParentRun,
    progress: Progress,
) -> None:
    """A trial that ends before anything is built: told to Optuna, a child run that says why, a progress line."""
    trial.set_user_attr(attr, why)
    study.tell(trial, state=state)
    parent.record_child(
        trial.number, study.study_name, trial.params, "FAILED" if state == TrialState.FAIL else "PRUNED", why
    )
    progress.line(study, trial)


def reuse(study: optuna.Study, trial: optuna.Trial, source: optuna.trial.FrozenTrial) -> None:
    """A point the study has measured: tell Optuna its figures instead of building and measuring it again."""
    if source.state != TrialState.COMPLETE:
        error = f"same settings as trial {source.number}, which ended {source.state.name}"
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        return
    log.info(
        "trial %d: same settings as trial %d, reusing its figures (hydra.sweeper.allow_repeats=true measures again)",
        trial.number,
        source.number,
    )
    trial.set_user_attr("reused_from", source.number)
    for key in ("mlflow_run_id", "spread"):
        if key in source.user_attrs:
            trial.set_user_attr(key, source.user_attrs[key])
    for name, violation in source.constraints.items():
        trial.set_constraint(name, violation)
    study.tell(trial, source.values)


def tell_figures(study: optuna.Study, trial: optuna.Trial, ret: Any, s: SearchSettings) -> None:
    """A job that ran to its end (or crashed): its figures, spread and constraints told to Optuna."""
    if ret.status != JobStatus.COMPLETED:
        error = ret._return_value
        log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return
    result = sweeper_api.read_result(Path(ret.hydra_cfg.hydra.runtime.output_dir))
    figures = result.figures
    if result.run_id:
        trial.set_user_attr("mlflow_run_id", result.run_id)
    spread = {n: [figures[f"{n}_min"], figures[f"{n}_max"]] for n in s.objectives if f"{n}_min" in figures}
    if spread:
        trial.set_user_attr("spread", spread)
    missing = [name for name in s.objectives if name not in figures]
    if missing:
        trial.set_user_attr("error", f"figures {missing} were not recorded by this run")
        study.tell(trial, state=TrialState.FAIL)
        return
    for figure, (op, bound) in s.constraints.items():
        if figure in figures:
            trial.set_constraint(figure, constraint_violation(op, bound, figures[figure]))
        else:  # a GPU figure on a CPU run is absent: the constraint cannot be judged, so it does not bind
            log.warning("constraint on %s not applied to trial %d: the figure is absent", figure, trial.number)
    study.tell(trial, [figures[name] for name in s.objectives])
