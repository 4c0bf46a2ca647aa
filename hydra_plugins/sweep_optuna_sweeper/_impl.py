"""The search loop: ask Optuna for a batch of trials, prune the infeasible ones, launch the rest, tell the results.

Each trial is a Hydra job (so any launcher runs it) and an MLflow child run of the sweep's parent run, which the
multirun callback (sweep/multirun.py) opened. The study lives in an RDB storage, so a sweep that is
interrupted and started again continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweep import sweeper_api

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid", "gp")
CONSTRAINT = re.compile(r"^\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
CONFIG_GROUPS = ("model", "backend", "workload", "tracker")


class SearchSpaceError(ValueError):
    pass


# -- search space ---------------------------------------------------------------------------------------------
def distribution_for(override: Override) -> BaseDistribution:
    """Hydra sweep syntax → an Optuna distribution. Hydra's range() excludes its stop, like Python's."""
    sweep = override.value()
    key = override.get_key_element()
    log_scale = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution([v for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise SearchSpaceError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) holds no value")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(sweep.step), log=False)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(sweep.step))
    if isinstance(sweep, IntervalSweep):  # Hydra parses interval bounds as floats: tag(int, ...) asks for ints
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise SearchSpaceError(f"{key}: unsupported sweep {override.input_line!r}")


def split_overrides(overrides: Sequence[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Sweeps become the search space; every other override stays fixed for all trials."""
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for override in overrides:
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution_for(override)
        else:
            fixed.append(override.input_line)  # exactly as given, with any +/~ prefix
    return space, fixed


def grid_values(space: dict[str, BaseDistribution]) -> dict[str, list]:
    grid = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise SearchSpaceError(f"sampler=grid needs choice() or range() for every parameter; {name} is {dist}")
    return grid


def enqueue_grid(study: optuna.Study, space: dict[str, BaseDistribution], seed: int | None) -> None:
    """Grid search as enqueued trials, in a seeded order, skipping points the study already holds.

    Optuna's GridSampler calls study.stop() when the grid is done, which only works inside study.optimize();
    this sweeper drives the study with ask/tell, so it enqueues the grid itself.
    """
    import random

    grid = grid_values(space)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(seed).shuffle(points)
    seen = [t.params for t in study.trials if t.state != TrialState.WAITING]
    for point in points:
        if point not in seen:
            study.enqueue_trial(point, skip_if_exists=True)


def parse_constraints(constraints: dict[str, str]) -> dict[str, tuple[str, float]]:
    parsed = {}
    for figure, rule in constraints.items():
        match = CONSTRAINT.match(str(rule))
        if not match:
            raise SearchSpaceError(f"hydra.sweeper.constraints.{figure}={rule!r}: write '<=value' or '>=value'")
        parsed[figure] = (match.group(1), float(match.group(2)))
    return parsed


def constraint_violation(op: str, bound: float, value: float) -> float:
    """Optuna's convention: <= 0 is feasible, and the size says by how much it is violated."""
    return value - bound if op == "<=" else bound - value


def override_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) and not re.fullmatch(r"[\w.\-/]+", value) else str(value)


def overrides_for(fixed: list[str], params: dict[str, Any]) -> list[str]:
    """The command-line overrides of one point of the space: the fixed ones, then the sampled values."""
    return fixed + [f"{k}={override_value(v)}" for k, v in params.items()]


# -- the sweeper ----------------------------------------------------------------------------------------------
class OptunaSearch:
    def __init__(
        self,
        sampler,
        seed,
        n_trials,
        n_jobs,
        study_name,
        storage,
        objectives,
        constraints,
        max_failure_rate,
        params,
        best_config_dir,
    ):
        if sampler not in SAMPLERS:
            raise SearchSpaceError(
                f"hydra.sweeper.sampler={sampler!r} is not allowed; choose one of: {', '.join(SAMPLERS)}"
            )
        self.sampler_name, self.seed = sampler, seed
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.study_name, self.storage = study_name, storage
        self.objectives = dict(objectives or {})
        self.constraints = parse_constraints(dict(constraints or {}))
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})
        self.best_config_dir = best_config_dir

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- set-up of the study --------------------------------------------------------------------------------
    def make_sampler(self) -> optuna.samplers.BaseSampler:
        if self.sampler_name in ("random", "grid"):  # grid: the points are enqueued, see enqueue_grid
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler_name == "gp":
            return optuna.samplers.GPSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)

    def open_study(self, space: dict[str, BaseDistribution]) -> optuna.Study:
        storage = self.storage or f"sqlite:///{Path.cwd() / 'mlruns' / 'optuna.db'}"
        if storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            storage=storage,
            sampler=self.make_sampler(),
            study_name=self.study_name
            or f"{self.config.tracker.experiment}-{self.config.model.name}-{self.config.backend.name}",
            directions=list(self.objectives.values()),
            load_if_exists=True,
        )
        if self.sampler_name == "grid":
            enqueue_grid(study, space, self.seed)
        # Trials an interrupted invocation left RUNNING never report: close them so the study stays sound.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("trial %d was left running by an interrupted sweep: marking it FAIL", trial.number)
            study.tell(trial.number, state=TrialState.FAIL)
        return study

    # -- the loop -------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space, fixed = split_overrides(overrides)
        if not space:
            raise SearchSpaceError("no search space: give sweeps such as 'engine.max_batch_size=choice(1,2,4)'")
        if not self.objectives:
            self.objectives = {self.config.objective.metric: self.config.objective.direction}
        for name in self.objectives:
            sweeper_api.check_figure(f"hydra.sweeper.objectives.{name}", name)
        for name in self.constraints:
            sweeper_api.check_figure(f"hydra.sweeper.constraints.{name}", name)
        study = self.open_study(space)
        n_trials = self.n_trials
        if self.sampler_name == "grid":
            n_trials = min(n_trials, math.prod(len(v) for v in grid_values(space).values()))
        parent = ParentRun(self.config)
        parent.log_settings(self, space, fixed, study)

        job_index = _finished(study)
        log.info(
            "study %s: %d of %d trials done, %d to run (storage %s)",
            study.study_name,
            _finished(study),
            n_trials,
            max(0, n_trials - _finished(study)),
            self.storage or "mlruns/optuna.db",
        )
        results = []
        while (remaining := n_trials - _finished(study)) > 0:
            batch = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            runnable = []
            for trial in batch:
                trial_overrides = overrides_for(fixed, trial.params) + [
                    f"+tracker.tags.{sweeper_api.TRIAL_TAG}={trial.number}",
                    f"+tracker.tags.{sweeper_api.STUDY_TAG}={study.study_name}",
                ]
                reason = self.infeasible(trial_overrides)
                if reason:
                    log.info("trial %d pruned before building: %s", trial.number, reason)
                    trial.set_user_attr("pruned_reason", reason)
                    study.tell(trial, state=TrialState.PRUNED)
                    parent.record_pruned(trial.number, study.study_name, trial.params, reason)
                else:
                    runnable.append((trial, trial_overrides))
            if not runnable:
                continue
            returns = self.launcher.launch([o for _, o in runnable], initial_job_idx=job_index)
            job_index += len(runnable)
            for (trial, _), ret in zip(runnable, returns):
                self.tell(study, trial, ret)
            results.append(returns)
            self.check_failure_rate(study, n_trials)
        parent.log_summary(self, study)
        self.write_best_config(study, fixed, parent)
        return results

    def infeasible(self, overrides: list[str]) -> str | None:
        """Compose the trial's config and run every check a run makes before building; return why it fails."""
        return sweeper_api.infeasible(self.hydra_context.config_loader.load_sweep_config(self.config, overrides))

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret: Any) -> None:
        if ret.status != JobStatus.COMPLETED:
            error = ret._return_value
            log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            study.tell(trial, state=TrialState.FAIL)
            return
        figures = sweeper_api.read_result(Path(ret.hydra_cfg.hydra.runtime.output_dir))
        missing = [name for name in self.objectives if name not in figures]
        if missing:
            trial.set_user_attr("error", f"figures {missing} were not recorded by this run")
            study.tell(trial, state=TrialState.FAIL)
            return
        for figure, (op, bound) in self.constraints.items():
            if figure in figures:
                trial.set_constraint(figure, constraint_violation(op, bound, figures[figure]))
            else:  # a GPU figure on a CPU run is absent: the constraint cannot be judged, so it does not bind
                log.warning("constraint on %s not applied to trial %d: the figure is absent", figure, trial.number)
        study.tell(trial, [figures[name] for name in self.objectives])

    def check_failure_rate(self, study: optuna.Study, n_trials: int) -> None:
        """Stop once more than max_failure_rate of the planned trials crashed: the rest would likely crash too."""
        failed = [t for t in study.trials if t.state == TrialState.FAIL]
        if len(failed) > self.max_failure_rate * n_trials:
            raise RuntimeError(
                f"{len(failed)} of {n_trials} planned trials failed, above hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate}; last error: {failed[-1].user_attrs.get('error')}"
            )

    def write_best_config(self, study: optuna.Study, fixed: list[str], parent: ParentRun) -> None:
        best = best_trials(study)
        if not best:
            log.warning("no feasible completed trial: no best config written")
            return
        trial = best[0]
        overrides = overrides_for(fixed, trial.params)
        composed = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        text = best_config_yaml(study.study_name, trial, dict(composed.hydra.runtime.choices), overrides)
        path = sweeper_api.best_config_path(self.best_config_dir, study.study_name)
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


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best feasible trial (one objective), or the Pareto front (several), best first objective first."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    if len(study.directions) == 1:
        try:
            return [study.best_trial]
        except ValueError:  # no feasible trial
            return []
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return sorted(study.best_trials, key=lambda t: -sign * t.values[0])


def best_config_yaml(study_name: str, trial: optuna.trial.FrozenTrial, choices: dict, overrides: list[str]) -> str:
    """A package-global config: the trial's group choices go to the defaults list, its values to their keys."""
    defaults: list[Any] = [{f"override /{group}": choices[group]} for group in CONFIG_GROUPS if group in choices]
    values = OmegaConf.create({})
    for item in overrides:
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        group_choice = key in CONFIG_GROUPS or key == "search"  # already in the defaults list, or the sweep itself
        if not group_choice and not key.startswith(("hydra.", "tracker.tags.")):
            OmegaConf.update(values, key, yaml.safe_load(value), force_add=True)
    body = {"defaults": defaults + ["_self_"], **OmegaConf.to_container(values)}
    header = (
        f"# @package _global_\n# Best trial {trial.number} of study {study_name}: {trial.values}\n"
        f"# Rerun from the directory above conf/: python -m sweep --config-dir conf +best={study_name}\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))


# -- MLflow parent run ----------------------------------------------------------------------------------------
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

    def log_settings(self, search: OptunaSearch, space: dict, fixed: list[str], study: optuna.Study) -> None:
        if not self.run_id:
            return
        self.run.set_tags(
            {"sweep.kind": "optuna", "optuna.study": study.study_name, "mlflow.runName": study.study_name}
        )
        self.run.log_params(
            {
                "optuna.sampler": search.sampler_name,
                "optuna.seed": search.seed,
                "optuna.n_trials": search.n_trials,
                "optuna.n_jobs": search.n_jobs,
                "optuna.objectives": json.dumps(search.objectives),
                "optuna.constraints": json.dumps({k: f"{op}{b}" for k, (op, b) in search.constraints.items()}),
                "optuna.search_space": json.dumps({k: repr(v) for k, v in space.items()}),
                "optuna.fixed_overrides": " ".join(fixed),
            }
        )

    def record_pruned(self, number: int, study_name: str, params: dict, reason: str) -> None:
        """A pruned trial gets a child run too, so the UI shows what was skipped and why."""
        if not self.run_id:
            return
        run = self.tracker.start_run(
            f"trial-{number}-pruned",
            {
                sweeper_api.TRIAL_TAG: number,
                sweeper_api.STUDY_TAG: study_name,
                "optuna.state": "PRUNED",
                "pruned_reason": reason,
            },
            parent_run_id=self.run_id,
        )
        run.log_params(params)
        run.end("FINISHED")

    def log_summary(self, search: OptunaSearch, study: optuna.Study) -> None:
        if not self.run_id:
            return
        value = "values" if len(study.directions) > 1 else "value"
        table = study.trials_dataframe(attrs=("number", "state", value, "params", "user_attrs", "constraints"))
        self.run.log_text(table.to_csv(index=False), "trials.csv")
        best = best_trials(study)
        if best:
            metrics = {f"best.{name}": value for name, value in zip(search.objectives, best[0].values)}
            self.run.log_metrics(metrics)
            self.run.log_params({f"best.{k}": v for k, v in best[0].params.items()} | {"best.trial": best[0].number})
        counts = {state.name: sum(t.state == state for t in study.trials) for state in TrialState}
        self.run.log_metrics({f"trials.{k.lower()}": v for k, v in counts.items()})
        for path in study_plots(study, search.objectives).values():
            self.run.log_artifact(path, "plots")


def study_plots(study: optuna.Study, objectives: dict[str, str]) -> dict[str, Path]:
    """Optimisation history, parameter importance and (for several objectives) the Pareto front, as PNG files."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
    out = Path(tempfile.mkdtemp(prefix="optuna-plots-"))
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
