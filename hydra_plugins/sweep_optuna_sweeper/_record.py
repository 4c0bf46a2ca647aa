"""What a person sees of a search: one progress line per trial, the parent run's settings, summary and plots,
and the best trial as a config to rerun (or why there is none)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._budget import Budget
from hydra_plugins.sweep_optuna_sweeper._prepare import Prepared
from hydra_plugins.sweep_optuna_sweeper._space import settings_text, space_identity
from hydra_plugins.sweep_optuna_sweeper._study import best_trials, tally
from hydra_plugins.sweep_optuna_sweeper.config import OptunaSweeperConf
from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)
CONFIG_GROUPS = ("model", "backend", "workload", "tracker")


class Progress:
    """One line per finished trial: `trial 3 · 4/12 · max_batch_size=8 · 1378 tok/s (1350–1390) · best …`."""

    def __init__(self, n_trials: int, objectives: dict[str, str]):
        self.n_trials, self.objectives = n_trials, objectives
        self.started = time.monotonic()
        self.count = 0

    def value_text(self, values: Sequence[float], spread: dict | None = None) -> str:
        parts = []
        for name, value in zip(self.objectives, values):
            unit = sweeper_api.figure_unit(name)
            text = f"{value:.4g}{' ' + unit if unit else ''}"
            if spread and name in spread:
                text += f" ({spread[name][0]:.4g}–{spread[name][1]:.4g})"
            parts.append(text)
        return ", ".join(parts)

    def line(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.count += 1
        frozen = study.get_trials(deepcopy=False)[trial.number]
        attrs = frozen.user_attrs
        if frozen.state == TrialState.COMPLETE:
            outcome = self.value_text(frozen.values, attrs.get("spread"))
            if "reused_from" in attrs:
                outcome += f" (as trial {attrs['reused_from']}, not run again)"
        elif frozen.state == TrialState.PRUNED:
            outcome = f"pruned: {attrs.get('pruned_reason', '')}"
        else:
            outcome = f"{frozen.state.name}: {attrs.get('error', '')}"[:200]
        best = best_trials(study)
        best_text = f"best {self.value_text(best[0].values)} (trial {best[0].number})" if best else "no best yet"
        finished = tally(study).counted
        elapsed = time.monotonic() - self.started
        left = elapsed / self.count * max(0, self.n_trials - finished)
        log.info(
            "trial %d · %d/%d · %s · %s · %s · %s elapsed, ~%s left",
            trial.number,
            finished,
            self.n_trials,
            settings_text(frozen.params),
            outcome,
            best_text,
            minutes(elapsed),
            minutes(left),
        )


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"


def best_config_yaml(study_name: str, trial: optuna.trial.FrozenTrial, choices: dict, overrides: list[str]) -> str:
    """A package-global config: the trial's group choices go to the defaults list, its values to their keys.

    A deletion (`~key`) or a key added to the config (`+key=value`) cannot be written in a config (the schema has no
    such key): the header's rerun command carries it.
    """
    defaults: list[Any] = [{f"override /{group}": choices[group]} for group in CONFIG_GROUPS if group in choices]
    values = OmegaConf.create({})
    on_command_line = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~").startswith(("hydra.", "tracker.tags.")):  # the sweep's own settings, the trial's tags
            continue
        if key.startswith(("~", "+")):
            on_command_line.append(item)
            continue
        group_choice = key in CONFIG_GROUPS or key == "search"  # already in the defaults list, or the sweep itself
        if not group_choice:
            OmegaConf.update(values, key, yaml.safe_load(value), force_add=True)
    body = {"defaults": defaults + ["_self_"], **OmegaConf.to_container(values)}
    rerun = f"python -m sweep --config-dir conf +best={study_name}" + "".join(f" '{d}'" for d in on_command_line)
    header = (
        f"# @package _global_\n# Best trial {trial.number} of study {study_name}: {trial.values}\n"
        f"# Rerun from the directory above conf/: {rerun}\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def write_best_config(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    choices: dict,
    overrides: list[str],
    best_config_dir: str | None,
    parent: ParentRun,
) -> Path:
    """The best trial as conf/best/<study>.yaml (and in the parent run), with the command that reruns it."""
    text = sweeper_api.redact(best_config_yaml(study.study_name, trial, choices, overrides))
    path = sweeper_api.best_config_path(best_config_dir, study.study_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    parent.log_text(text, "best_config.yaml")
    log.info(
        "best trial %d %s written to %s; rerun it with: python -m sweep --config-dir %s +best=%s",
        trial.number,
        trial.values,
        path,
        path.parent.parent,
        study.study_name,
    )
    return path


def no_best_reason(
    study: optuna.Study, objectives: dict[str, str], constraints: dict[str, tuple[str, float]], config: DictConfig
) -> str:
    """Why a search ends without a best trial (best_trials is empty), and what to loosen."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    if not complete:
        return "no trial completed (their errors are above, and in trials.csv of the parent run)"
    if not feasible:
        bounds = ", ".join(f"{name}{op}{bound:g}" for name, (op, bound) in constraints.items())
        return f"no completed trial met the constraints ({bounds}): loosen hydra.sweeper.constraints"
    scored = ", ".join(f"{name}=0" for name, direction in objectives.items() if direction == "maximize")
    slo = {k: v for k, v in OmegaConf.to_container(config.slo).items() if k != "name" and v is not None}
    if not slo:
        return f"no setting met the objective: every feasible trial scored {scored}; search other settings"
    preset = f"slo={config.slo.name}: " if config.slo.name != "none" else ""
    targets = preset + " ".join(f"slo.{k}={v:g}" for k, v in slo.items())
    loosen = f"loosen the SLO (larger {', '.join(f'slo.{k}' for k in slo)})"
    if config.workload.scenario == "rate":
        loosen += f", offer less load (now workload.request_rate={config.workload.request_rate:g})"
    return (
        f"no setting met the objective or the SLO: every feasible trial scored {scored} under the SLO ({targets}); "
        f"{loosen}, or search other settings"
    )


class ParentRun:
    """The sweep's parent run, opened by the multirun callback; a no-op when tracking is off."""

    def __init__(self, config: DictConfig):
        opened = sweeper_api.parent_run(config)
        self.run_id = None
        if opened:
            self.tracker, self.run = opened
            self.run_id = self.run.run_id

    def log_text(self, text: str, name: str) -> None:
        if self.run_id:
            self.run.log_text(text, name)

    def log_settings(self, st: OptunaSweeperConf, prepared: Prepared, study: optuna.Study) -> None:
        """The sweeper's settings, its sampler's, and the search they resolved to."""
        if not self.run_id:
            return
        search = prepared.search
        # the parent is named after the study it searched (the multirun callback opened it before the study existed)
        self.run.set_tags(
            {"sweep.kind": "optuna", "optuna.study": study.study_name, "mlflow.runName": study.study_name}
        )
        self.run.log_params(
            {
                "optuna.sampler": prepared.sampler.name,
                "optuna.sampler_settings": json.dumps(prepared.sampler.settings, sort_keys=True),
                "optuna.seed": st.seed,
                "optuna.n_trials": search.n_trials,
                "optuna.n_jobs": st.n_jobs,
                "optuna.workers": st.workers,
                "optuna.objectives": json.dumps(search.objectives),
                "optuna.constraints": json.dumps({k: f"{op}{b}" for k, (op, b) in search.constraints.items()}),
                "optuna.search_space": json.dumps(space_identity(search.space)),
                "optuna.fixed_overrides": " ".join(search.fixed),
                **{
                    f"optuna.{k}": getattr(st, k)
                    for k in ("allow_repeats", "confirm_top_k", "warm_start", "budget_minutes")
                },
                "optuna.gpus_per_trial": prepared.gpus_per_trial,  # what each trial got: it follows engine.tp_size
            }
        )

    def fail_trial_runs(self, study_name: str, number: int, why: str) -> None:
        """End FAILED the run of a trial whose worker died (left RUNNING, or KILLED by a later start on its host)."""
        if self.run_id:
            self.tracker.fail_runs({sweeper_api.STUDY_TAG: study_name, sweeper_api.TRIAL_TAG: number}, why)

    def record_child(self, number: int, study_name: str, params: dict, state: str, reason: str) -> None:
        """A trial that never ran (pruned, or failed in its preparation) gets a child run too, saying why."""
        if not self.run_id:
            return
        run = self.tracker.start_run(
            f"trial {number}: {settings_text(params)} ({state.lower()})",
            {
                sweeper_api.TRIAL_TAG: number,
                sweeper_api.STUDY_TAG: study_name,
                "optuna.state": state,
                "pruned_reason" if state == "PRUNED" else "error": reason,
            },
            parent_run_id=self.run_id,
        )
        run.log_params(params)
        run.end("FINISHED" if state == "PRUNED" else "FAILED")

    def log_summary(
        self, objectives: dict[str, str], study: optuna.Study, budget: Budget, job_s: float | None = None
    ) -> None:
        """The study's outcome into the parent; job_s: the job seconds of all the session's workers (else this
        process's)."""
        if not self.run_id:
            return
        value = "values" if len(study.directions) > 1 else "value"
        table = study.trials_dataframe(attrs=("number", "state", value, "params", "user_attrs", "constraints"))
        self.run.log_text(table.to_csv(index=False), "trials.csv")
        best = best_trials(study)
        if best:
            metrics = {f"best.{name}": value for name, value in zip(objectives, best[0].values)}
            confirmed = study.user_attrs.get("confirmed", {}).get(str(best[0].number))
            if confirmed:
                metrics[f"best.confirmed.{next(iter(objectives))}"] = confirmed["mean"]
            self.run.log_metrics(metrics)
            self.run.log_params({f"best.{k}": v for k, v in best[0].params.items()} | {"best.trial": best[0].number})
        counts = {state.name: sum(t.state == state for t in study.trials) for state in TrialState}
        counts["REUSED"] = sum("reused_from" in t.user_attrs for t in study.trials)
        self.run.log_metrics({f"trials.{k.lower()}": v for k, v in counts.items()} | budget.figures(job_s))
        with tempfile.TemporaryDirectory(prefix="optuna-plots-") as out:  # the tracker keeps its own copies
            for path in study_plots(study, objectives, Path(out)).values():
                self.run.log_artifact(path, "plots")


def study_plots(study: optuna.Study, objectives: dict[str, str], out: Path) -> dict[str, Path]:
    """Optimisation history, parameter importance and (for several objectives) the Pareto front, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
    names = list(objectives)
    plots = {}
    # PED-ANOVA ranks parameters by how they reach *low* targets: flip the sign of a maximised objective.
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    makers = {
        "param_importances": lambda: ovm.plot_param_importances(
            study,
            target=lambda t: sign * t.values[0],
            target_name=names[0],  # the sign only orders; not shown
        ),
    }
    if len(names) == 1:
        makers["optimization_history"] = lambda: ovm.plot_optimization_history(study, target_name=names[0])
    else:
        makers["optimization_history"] = lambda: ovm.plot_optimization_history(
            study, target=lambda t: t.values[0], target_name=names[0]
        )
        makers["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
    for name, make in makers.items():
        try:
            make()
            path = out / f"{name}.png"
            plt.gcf().set_size_inches(8, 5)
            plt.savefig(path, bbox_inches="tight", dpi=100)
            plots[name] = path
        except Exception as exc:  # e.g. importance needs two completed trials: a missing plot is not an error
            log.warning("plot %s skipped: %s", name, exc)
        finally:
            plt.close("all")
    return plots
