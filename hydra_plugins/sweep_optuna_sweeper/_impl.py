"""The search loop: ask Optuna for a batch of trials, prune the infeasible ones, launch the rest, tell the results.

Each trial is a Hydra job (so any launcher runs it) and an MLflow child run of the sweep's parent run, which the
multirun callback (sweep.multirun.callback) opened. Everything the sweep could refuse is checked by `prepare`, which the
callback calls before it opens the parent run. The study lives in an RDB storage with Optuna's heartbeat, so a
sweep that is interrupted and started again continues where it stopped.

Workers: any number of processes running the same command share the study (Optuna's distributed pattern). Each
asks for its next trial as soon as it is free, while the trials that count and those running elsewhere stay under
`n_trials`, so the study ends with exactly `n_trials`. They share one parent run through the study's *session* (a
user attribute: the parent's id, opened by the first process, closed by the last), and a study lock (a file lock
beside SQLite, an advisory lock in PostgreSQL) makes counting and asking, opening and closing, one process at a
time. A worker whose heartbeat stops (kill -9, a lost node) has its trial failed, its run ended FAILED, and the
trial run again by another worker. `hydra.sweeper.workers=N` starts N such workers on this host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus, configure_log
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper.record import ParentRun, Progress, best_config_yaml
from hydra_plugins.sweep_optuna_sweeper.space import (
    WARM_START_KEYS,
    constraint_violation,
    enqueue_grid,
    grid_values,
    override_value,
    overrides_for,
    parse_constraints,
    settings_text,
    space_digest,
    space_identity,
    split_overrides,
    warm_start_point,
)
from hydra_plugins.sweep_optuna_sweeper.study import Heartbeat, best_trials, tally
from sweep.multirun import sweeper_api
from sweep.multirun.sweeper_api import ConfigError

log = logging.getLogger(__name__)
# The heartbeat, metric names and several samplers are "experimental" in Optuna 5: used on purpose, so no warning
# per use. This sweeper drives the study with ask/tell and beats the heartbeat itself (class Heartbeat).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

# sampler -> what it fits (the README's table says the same)
SAMPLERS = ("tpe", "random", "grid", "gp", "nsgaii", "qmc", "cmaes")
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
# Launchers (their _target_) that start every job of a batch at once, each in a fresh process on this host: the
# sweeper pins job i of a batch to GPU group i. submitit's local executor gives every job the same GPUs itself.
PINNED_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",)
# Launchers that run jobs in worker processes they keep for later jobs (joblib's loky): CUDA fixes a process's GPUs
# when it starts in it, so a later trial there would run on an earlier trial's GPUs, beside another trial.
REUSING_LAUNCHERS = ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",)
# Ray reuses its workers too, unless a task asks for GPUs: then each gets a fresh one with its own GPUs.
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
RAY_GPUS_KEY = "hydra.launcher.ray.remote.num_gpus"
# The study's user attribute that holds its session: the parent run its workers share, and who opened it.
SESSION_ATTR = "session"
WORKER_ATTR = "worker"  # a trial's user attribute: the host:pid of the worker that asked for it
WAIT_POLL_S = 2.0  # how often a worker with nothing left to ask looks at the trials other workers run


def end_before_building(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, attr: str, why: str, parent: Any, progress: Any
) -> None:
    """A trial that ends before anything is built: told to Optuna, a child run that says why, a progress line."""
    trial.set_user_attr(attr, why)
    study.tell(trial, state=state)
    parent.record_child(
        trial.number, study.study_name, trial.params, "FAILED" if state == TrialState.FAIL else "PRUNED", why
    )
    progress.line(study, trial)


def check_numbers(st: dict[str, Any]) -> None:
    """The sweeper's numeric settings, each within what it can mean."""
    for key in ("n_trials", "n_jobs", "gpus_per_trial", "heartbeat_interval", "workers"):
        if st[key] < 1:
            raise ConfigError(f"hydra.sweeper.{key}={st[key]} is not allowed; it must be 1 or more")
    if st["grace_period"] is not None and st["grace_period"] < 1:
        raise ConfigError(f"hydra.sweeper.grace_period={st['grace_period']} is not allowed; 1 or more seconds")
    if st["confirm_top_k"] < 0:
        raise ConfigError(f"hydra.sweeper.confirm_top_k={st['confirm_top_k']} is not allowed; 0 or more")
    if st["budget_minutes"] is not None and st["budget_minutes"] <= 0:
        raise ConfigError(f"hydra.sweeper.budget_minutes={st['budget_minutes']} is not allowed; above 0")


def gpu_slots(config: DictConfig, n_jobs: int, gpus_per_trial: int, device: str) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each of a batch's n_jobs parallel trials; None where the sweeper pins nothing.

    Only a launcher that starts each job in a fresh local process is pinned. The basic launcher runs one job at a
    time in this process; SLURM (submitit_slurm) and Ray (remote.num_gpus) give each job the GPUs it asks for.
    """
    launcher = OmegaConf.select(config, "hydra.launcher._target_")  # None in a config composed without Hydra's part
    if launcher in REUSING_LAUNCHERS and device == "cuda":
        choice = OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher")
        raise ConfigError(
            f"hydra/launcher={choice} with device=cuda is not allowed: it reuses its worker processes, and a "
            "process keeps the GPUs CUDA started with, so trials would not stay on their own GPUs; use "
            "hydra/launcher=submitit_local (a fresh process per trial) with hydra.sweeper.n_jobs and "
            "hydra.sweeper.gpus_per_trial"
        )
    if launcher == RAY_LAUNCHER and device == "cuda" and not OmegaConf.select(config, RAY_GPUS_KEY):
        raise ConfigError(
            f"{RAY_GPUS_KEY} is not set: Ray would give the trials no GPUs of their own and reuse "
            "its worker processes; set it to the GPUs per trial, or use hydra/launcher=ray_gpus (it asks for "
            "hydra.sweeper.gpus_per_trial)"
        )
    if launcher not in PINNED_LAUNCHERS:
        return None
    if config.hydra.launcher.gpus_per_node is not None:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={config.hydra.launcher.gpus_per_node} is not allowed with "
            "hydra/launcher=submitit_local: it gives every trial the same GPUs; leave it unset and set "
            "hydra.sweeper.gpus_per_trial (each parallel trial then gets GPUs of its own)"
        )
    try:
        groups = sweeper_api.gpu_groups(n_jobs, gpus_per_trial, "hydra.sweeper.n_jobs")
    except ConfigError as exc:
        raise ConfigError(f"{exc}, or a smaller hydra.sweeper.gpus_per_trial (now {gpus_per_trial})") from None
    return None if groups[0] is None else groups  # a machine without GPUs: nothing to pin


@dataclass
class SearchSettings:
    space: dict[str, BaseDistribution]
    fixed: list[str]
    objectives: dict[str, str]
    constraints: dict[str, tuple[str, float]]
    study_name: str
    storage_url: str
    n_trials: int


class OptunaSearch:
    def __init__(self, **settings: Any):
        self.settings = settings
        self.sampler_name, self.seed = settings["sampler"], settings["seed"]
        self.n_jobs = settings["n_jobs"]
        self.max_failure_rate = settings["max_failure_rate"]
        self.best_config_dir = settings["best_config_dir"]
        self.s: SearchSettings | None = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.parent: ParentRun | None = None  # the sweep's parent run, once the sweep runs
        self.running_here: set[int] = set()  # ids of the trials this process asked for and has not told yet

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def prepare(self, config: DictConfig, arguments: Sequence[str], config_loader: Any = None) -> SearchSettings:
        """Check everything a sweep could refuse, before the parent run and the first trial; ConfigError if not."""
        st = self.settings
        if self.sampler_name not in SAMPLERS:
            raise ConfigError(
                f"hydra.sweeper.sampler={self.sampler_name!r} is not allowed; choose one of: {', '.join(SAMPLERS)}"
            )
        parser = OverridesParser.create(config_loader=config_loader)
        params = [f"{k}={v}" for k, v in (st["params"] or {}).items()]
        space, fixed = split_overrides(parser.parse_overrides(params + list(arguments)))
        if not space:
            raise ConfigError(
                "no search space: give sweeps such as 'engine.max_batch_size=choice(1,2,4)' or a preset (search=...)"
            )
        objectives = dict(st["objectives"] or {}) or {config.objective.metric: config.objective.direction}
        for name, direction in objectives.items():
            sweeper_api.check_figure(f"hydra.sweeper.objectives.{name}", name)
            if direction not in ("maximize", "minimize"):
                raise ConfigError(
                    f"hydra.sweeper.objectives.{name}={direction!r} is not allowed; use maximize or minimize"
                )
        constraints = parse_constraints(dict(st["constraints"] or {}))
        for name in constraints:
            sweeper_api.check_figure(f"hydra.sweeper.constraints.{name}", name)
        if self.sampler_name in SINGLE_OBJECTIVE_SAMPLERS and len(objectives) > 1:
            raise ConfigError(
                f"hydra.sweeper.sampler={self.sampler_name} optimises one objective, {len(objectives)} are given; "
                "use nsgaii, tpe, gp or random for several"
            )
        if self.sampler_name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise ConfigError("hydra.sweeper.sampler=cmaes needs the cmaes package: pip install cmaes") from None
        n_trials = st["n_trials"]
        if self.sampler_name == "grid":
            n_trials = min(n_trials, math.prod(len(v) for v in grid_values(space).values()))
        check_numbers(st)
        model_name, model_id = sweeper_api.model_identity(config.model)
        study_name = st["study_name"]
        if not study_name:
            prefix = OmegaConf.select(config, "hydra.runtime.choices.search", default=None) or config.tracker.experiment
            digest = space_digest(space, objectives, model_id)
            study_name = f"{prefix}-{model_name}-{config.backend.name}-{digest}"
        sweeper_api.best_config_path(self.best_config_dir, study_name)  # a study name must be a file name
        storage_url = st["storage"] or f"sqlite:///{Path.cwd() / 'mlruns' / 'optuna.db'}"
        if not storage_url.startswith(("sqlite:///", "postgresql://", "postgresql+")):
            raise ConfigError(
                f"hydra.sweeper.storage={sweeper_api.redact(storage_url)!r} is not allowed; the study's workers share "
                "it through sqlite:///<file> (one host) or postgresql://<user>@<host>/<database> (any number of hosts)"
            )
        sweeper_api.check_storage_reachable(storage_url)
        if st["workers"] > 1:  # each worker gets its own GPUs: refuse what does not fit before anything runs
            sweeper_api.gpu_groups(st["workers"], st["gpus_per_trial"], "hydra.sweeper.workers")
        s = SearchSettings(space, fixed, objectives, constraints, study_name, storage_url, n_trials)
        self.check_resume(s, model_id)
        self.model_id = model_id
        self.device = sweeper_api.resolve_device(config.device)
        self.gpu_slots = gpu_slots(config, st["n_jobs"], st["gpus_per_trial"], self.device)
        return s

    def identity(self, s: SearchSettings, model_id: str) -> dict[str, Any]:
        """What a study was made for: resuming it with anything else is refused (unless resume_mismatched)."""
        return {"model": model_id, "search_space": space_identity(s.space), "objectives": s.objectives}

    def check_resume(self, s: SearchSettings, model_id: str) -> None:
        if (path := sweeper_api.sqlite_path(s.storage_url)) is not None and not path.exists():
            return
        try:
            with sweeper_api.store_lock(s.storage_url):  # loading a study creates the storage's tables if missing
                stored = optuna.load_study(study_name=s.study_name, storage=s.storage_url).user_attrs.get("identity")
        except KeyError:  # no such study yet
            return
        wanted = self.identity(s, model_id)
        if stored is None or stored == wanted or self.settings["resume_mismatched"]:
            return
        differ = ", ".join(k for k in wanted if stored.get(k) != wanted[k])
        raise ConfigError(
            f"hydra.sweeper.study_name={s.study_name!r} holds a study of another {differ} ({stored}); give another "
            "study_name, leave it out for one named after this search, or resume anyway with "
            "hydra.sweeper.resume_mismatched=true"
        )

    # -- the study ------------------------------------------------------------------------------------------
    def make_sampler(self) -> optuna.samplers.BaseSampler:
        samplers = optuna.samplers
        makers = {
            "random": samplers.RandomSampler,
            "grid": samplers.RandomSampler,  # the points are enqueued, see enqueue_grid
            "gp": samplers.GPSampler,
            "nsgaii": samplers.NSGAIISampler,
            "qmc": samplers.QMCSampler,
            "cmaes": samplers.CmaEsSampler,
            "tpe": samplers.TPESampler,
        }
        return makers[self.sampler_name](seed=self.seed)

    def open_study(self, s: SearchSettings) -> optuna.Study:
        # Each running trial's process records a heartbeat; a trial whose heartbeat stopped for the grace period
        # (its process died) is failed by the next worker that looks (fail_stale_trials), and retried once.
        with sweeper_api.store_lock(s.storage_url):  # two sweeps creating the storage at once both migrate it
            self.storage = optuna.storages.RDBStorage(
                s.storage_url,
                heartbeat_interval=self.settings["heartbeat_interval"],
                grace_period=self.settings["grace_period"],
                heartbeat_stale_trial_callback=self.retry_stale_trial,
            )
            study = optuna.create_study(
                storage=self.storage,
                sampler=self.make_sampler(),
                study_name=s.study_name,
                directions=list(s.objectives.values()),
                load_if_exists=True,
            )
        if "identity" not in study.user_attrs:
            study.set_user_attr("identity", self.identity(s, self.model_id))
        study.set_metric_names(list(s.objectives))  # optuna-dashboard shows the objectives by name
        if self.sampler_name == "grid":
            with self.lock(study):  # workers starting together would each enqueue the grid
                enqueue_grid(study, s.space, self.seed)
        return study

    @contextlib.contextmanager
    def lock(self, study: optuna.Study) -> Iterator[None]:
        """One process of the study's workers at a time: counting and asking, opening and closing the session.

        SQLite: the file lock beside the database (one host). PostgreSQL: an advisory lock of this study alone, on a
        pooled connection of the storage, since it is taken at every ask (store_lock's locks the whole database, on
        a connection of its own); the server releases it when the holding connection dies, so a killed worker never
        keeps it.
        """
        if sweeper_api.sqlite_path(self.storage.url) is not None:
            with sweeper_api.store_lock(self.storage.url):
                yield
        else:
            with sweeper_api.advisory_lock(self.storage.engine, f"sweep-study:{study.study_name}"):
                yield

    def retry_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback for a trial whose worker stopped beating (killed, its node lost), which it failed."""
        worker = trial.user_attrs.get(WORKER_ATTR, "unknown")
        self.retry(study, trial, f"its worker ({worker}) stopped recording a heartbeat: failed by {self.worker}")

    def retry(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, cause: str) -> None:
        """A failed trial that never got its result: run it again once, and end its MLflow run FAILED (its worker
        left it RUNNING, or KILLED), so that Optuna and MLflow count the same trials."""
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
        again = "not run again: it was a retry already" if trial.system_attrs.get("retry_history") else "run again"
        why = f"{cause}, {again}"
        log.warning("trial %d failed: %s", trial.number, why)
        if self.parent is not None:
            self.parent.fail_trial_runs(study.study_name, trial.number, why)

    def give_back_trials(self, study: optuna.Study, stopped_by: BaseException) -> None:
        """The trials this process was running when it stopped (Ctrl-C, SIGTERM, an error): failed and queued to
        run again now, as a dead worker's are after the grace period, so that no worker waits for them."""
        for trial_id in self.running_here:
            try:
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # told, or failed by another worker, meanwhile
                continue
            cause = f"its worker ({self.worker}) stopped: {type(stopped_by).__name__}: {stopped_by}"
            self.retry(study, self.storage.get_trial(trial_id), cause[:500])
        self.running_here = set()

    def warm_start(self, study: optuna.Study, s: SearchSettings) -> None:
        """On a new study, enqueue the point a memory model predicts, before the sampler takes over."""
        if not self.settings["warm_start"] or self.sampler_name == "grid" or study.trials:
            return
        if not any(key in s.space for key in WARM_START_KEYS):
            return
        try:
            defaults = self.compose(s.fixed)
            inputs = sweeper_api.memory_for_warm_start(defaults)
        except Exception as exc:  # a hint, never a reason to stop: the trials report their own errors
            inputs = f"{type(exc).__name__}: {exc}"
        if isinstance(inputs, str):
            log.info("warm start skipped: %s", inputs)
            return
        point = warm_start_point(s.space, inputs, defaults)
        if not point:
            log.info("warm start skipped: not one request fits in the %s", inputs.memory_source)
            return
        why = f"trtllm-bench's heuristic on {inputs.free_bytes / 1e9:.1f} GB of {inputs.memory_source}"
        study.enqueue_trial(point, user_attrs={"warm_start": why})
        log.info("warm start: the first trial tries %s (%s)", settings_text(point), why)

    # -- the session: one parent run for the study's workers -------------------------------------------------
    def new_session(self, parent_run_id: str | None, tracker: str | None) -> dict[str, Any]:
        # job_s: the seconds every worker of the session spent in its trials' jobs, added as each one leaves
        return {"parent_run_id": parent_run_id, "tracker": tracker, "opened_by": self.worker, "job_s": 0.0}

    def shared_parent_run_id(self, config: DictConfig, start_parent: Callable[[], str]) -> str:
        """The parent run of the study's open session in this tracker, or a new one that opens the session.

        The study lock makes this the arbiter among workers that start at the same instant on different hosts.
        """
        s = self.prepare(config, list(config.hydra.overrides.task))
        study = self.open_study(s)
        where = sweeper_api.tracker_location(config.tracker)
        with self.lock(study):
            session = study.user_attrs.get(SESSION_ATTR)
            if session and session["tracker"] == where and session["parent_run_id"]:
                log.info("study %s: joining the parent run %s of its workers", s.study_name, session["parent_run_id"])
                return session["parent_run_id"]
            run_id = start_parent()
            study.set_user_attr(SESSION_ATTR, self.new_session(run_id, where))
            return run_id

    def join_session(self, study: optuna.Study) -> dict[str, Any]:
        """The session this process works in: the one the multirun callback opened or joined, or a new one with
        this process's parent (none when untracked) if none is open."""
        with self.lock(study):
            session = study.user_attrs.get(SESSION_ATTR)
            if session is None:
                session = self.new_session(self.parent.run_id, sweeper_api.tracker_location(self.config.tracker))
                study.set_user_attr(SESSION_ATTR, session)
        return session

    def leave_session(self, study: optuna.Study, job_s: float, session: dict[str, Any] | None) -> dict | None:
        """Add this process's job time to the study's session, and close it if this process is the last of its
        workers: then the session is returned, and this process writes the summary and ends the parent run (through
        the callback). Any other leaves the parent to the last one. A worker another process started (session None)
        only adds its time: the process that started it closes."""
        with self.lock(study):
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial is not a live worker
            elsewhere = [t for t in tally(study).running if t._trial_id not in self.running_here]
            current = study.user_attrs.get(SESSION_ATTR)
            ours = current is not None and (session is None or same_session(current, session))
            last = ours and session is not None and not elsewhere
            if ours:
                current["job_s"] += job_s
                study.set_user_attr(SESSION_ATTR, None if last else current)
        if last:
            return current
        if session is not None:
            os.environ[sweeper_api.PARENT_STAYS_OPEN_ENV] = "1"
            log.info(
                "study %s: %d trial(s) still run in other workers; the parent run is left to the last of them",
                study.study_name,
                len(elsewhere),
            )
        return None

    # -- the loop -------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        s = self.s = self.prepare(self.config, arguments, self.hydra_context.config_loader)
        study = self.open_study(s)
        parent = self.parent = ParentRun(self.config)
        started_by = os.environ.get(sweeper_api.WORKER_ENV)  # "1/2": one of the workers another process started
        session = None if started_by else self.join_session(study)
        if session is not None and session["opened_by"] == self.worker:
            parent.log_settings(self, s, study)
        with self.lock(study):
            self.warm_start(study, s)
        budget = Budget(self.settings["budget_minutes"], self.device, self.settings["gpus_per_trial"])
        counted = tally(study).counted
        log.info(
            "study %s: %d of %d trials done, %d to run (storage %s)",
            study.study_name,
            counted,
            s.n_trials,
            max(0, s.n_trials - counted),
            sweeper_api.redact(s.storage_url),
        )
        try:
            if self.settings["workers"] > 1:
                results = self.run_workers(study, s)
            else:
                results = self.run_trials(study, s, budget)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the error being raised is what the user must see
                self.give_back_trials(study, exc)
                self.leave_session(study, budget.job_s, session)
            raise
        closed = self.leave_session(study, budget.job_s, session)
        if closed is None:
            return results
        self.confirm_top_k(study, s, tally(study).counted, budget)
        parent.log_summary(self, study, budget, closed["job_s"])
        self.write_best_config(study, s.fixed, parent)
        return results

    def run_trials(self, study: optuna.Study, s: SearchSettings, budget: Budget) -> list:
        """Ask, launch and tell until the study holds n_trials counted trials and none runs elsewhere.

        Counting and asking happen under the study lock, so workers never ask past n_trials together. A worker
        with nothing left to ask waits for the trials other workers run: one of them may be a dead worker's,
        which it then fails (fail_stale_trials) and runs again.
        """
        progress = Progress(s.n_trials, s.objectives)
        job_index = tally(study).counted
        results = []
        waiting = False
        with Heartbeat(self.storage, self.settings["heartbeat_interval"]) as heartbeat:
            while True:
                with self.lock(study):
                    optuna.storages.fail_stale_trials(study)
                    now = tally(study)
                    room = s.n_trials - now.counted - len(now.running)
                    batch = []
                    if room > 0 and budget.allows_another_batch():
                        batch = [study.ask(s.space) for _ in range(min(self.n_jobs, room))]
                        heartbeat.beat_for(batch)
                if not batch:
                    if room > 0 or not now.running:
                        break  # the budget is spent, or the study is done
                    if not waiting:
                        log.info("nothing left to ask; waiting for %d trial(s) of other workers", len(now.running))
                    waiting = True
                    time.sleep(WAIT_POLL_S)
                    continue
                waiting = False
                self.running_here = {t._trial_id for t in batch}
                for trial in batch:  # a retried trial carries the dead worker's attribute until here
                    trial.set_user_attr(WORKER_ATTR, self.worker)
                runnable, twins = self.triage(study, s, batch, self.parent, progress)
                if runnable:
                    started = time.monotonic()
                    returns = self.launch([o for _, o in runnable], job_index)
                    budget.spent(time.monotonic() - started, len(runnable))
                    job_index += len(runnable)
                    for (trial, _), ret in zip(runnable, returns):
                        self.tell(study, trial, ret)
                        progress.line(study, trial)
                    results.append(returns)
                for trial, twin in twins:  # same settings as a trial of this batch: its figures are known now
                    self.reuse(study, trial, study.trials[twin.number])
                    progress.line(study, trial)
                heartbeat.stop_beating_for(batch)
                self.running_here = set()
                self.check_failure_rate(study, s.n_trials)
        return results

    def run_workers(self, study: optuna.Study, s: SearchSettings) -> list:
        """hydra.sweeper.workers=N: N copies of this command on this host, each a worker of the study on its own
        GPUs, with this sweep's parent run in their environment (like torchrun, not a scheduler). Waits for them."""
        n = self.settings["workers"]
        groups = sweeper_api.gpu_groups(n, self.settings["gpus_per_trial"], "hydra.sweeper.workers")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        procs: list[subprocess.Popen] = []
        try:
            for i, gpus in enumerate(groups, start=1):
                out = sweep_dir / f"worker-{i}"
                command = worker_command(
                    sys.argv[1:],
                    {
                        "hydra.sweeper.workers": "1",
                        "hydra.sweeper.study_name": s.study_name,
                        "hydra.sweeper.storage": s.storage_url,
                        "hydra.sweep.dir": str(out),
                    },
                )
                env = os.environ | {sweeper_api.WORKER_ENV: f"{i}/{n}"}
                if gpus is not None:
                    env[sweeper_api.GPU_ENV] = gpus
                procs.append(subprocess.Popen(command, env=env))
                log.info("worker %d/%d: pid %d, GPUs %s, outputs in %s", i, n, procs[-1].pid, gpus, out)
            codes = [proc.wait() for proc in procs]
        finally:  # Ctrl-C or an error here: no worker outlives the sweep that started it
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        failed = [f"worker {i} exited with {code}" for i, code in enumerate(codes, start=1) if code != 0]
        counted = tally(study).counted
        if failed and counted < s.n_trials:
            raise RuntimeError(f"{'; '.join(failed)}; the study holds {counted} of {s.n_trials} trials")
        if failed:
            log.warning("%s; the other workers completed the study", "; ".join(failed))
        return []

    def what(self) -> str:
        """`tiny/hf`: the model and backend every trial's run name starts with, as a single run's does."""
        return f"{sweeper_api.model_identity(self.config.model)[0]}/{self.config.backend.name}"

    def compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def launch(self, job_overrides: list[list[str]], job_index: int) -> Sequence[Any]:
        """The jobs, at most one per GPU slot at once; job i of each round is pinned to slot i (see gpu_slots)."""
        # launchers log every job's full override list (from any module of their package): the progress line
        # replaces it on the console
        logging.getLogger(type(self.launcher).__module__.rpartition(".")[0]).setLevel(logging.WARNING)
        slots = self.gpu_slots
        size = len(slots) if slots else len(job_overrides) or 1
        returns: list[Any] = []
        try:
            for start in range(0, len(job_overrides), size):
                jobs = job_overrides[start : start + size]
                if slots is not None:  # Hydra sets env_set in the job's process before the task starts
                    jobs = [[*o, f'++hydra.job.env_set.{sweeper_api.GPU_ENV}="{g}"'] for o, g in zip(jobs, slots)]
                returns += self.launcher.launch(jobs, initial_job_idx=job_index + start)
            return returns
        finally:  # each job set up its own logging (console at WARNING): the sweeper's lines go to the console
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def job_overrides(self, study: optuna.Study, s: SearchSettings, params: dict, tags: dict, name: str) -> list[str]:
        """A trial's overrides: its point, its tags and run name, and a console that leaves the line to the sweeper."""
        extra = [f"+tracker.tags.{k}={v}" for k, v in {sweeper_api.STUDY_TAG: study.study_name, **tags}.items()]
        extra += [
            f"tracker.run_name={override_value(name)}",
            f"++hydra.job.env_set.{sweeper_api.SUMMARY_TO_LOG_ENV}=1",
            "++hydra.job.env_set.TQDM_DISABLE=1",  # no progress bars from the job: the console is the sweeper's
        ]
        if OmegaConf.select(self.config, "hydra.job_logging.handlers.console") is not None:
            extra.append("++hydra.job_logging.handlers.console.level=WARNING")  # full tables go to the job's log file
        return overrides_for(s.fixed, params) + extra

    def triage(
        self, study: optuna.Study, s: SearchSettings, batch: list[optuna.Trial], parent: ParentRun, progress: Progress
    ) -> tuple[list[tuple[optuna.Trial, list[str]]], list[tuple[optuna.Trial, optuna.Trial]]]:
        """Which trials of a batch to launch; the others are reused, pruned or failed here, each told to Optuna."""
        repeats = self.settings["allow_repeats"]
        measured = {point_key(t.params): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        runnable: list[tuple[optuna.Trial, list[str]]] = []
        launching: dict[str, optuna.Trial] = {}
        twins = []
        for trial in batch:
            key = point_key(trial.params)
            if not repeats and key in measured:
                self.reuse(study, trial, measured[key])
                progress.line(study, trial)
                continue
            if not repeats and key in launching:
                twins.append((trial, launching[key]))
                continue
            name = f"trial {trial.number}: {self.what()} {settings_text(trial.params)}"
            try:
                tags = {sweeper_api.TRIAL_TAG: trial.number, sweeper_api.WORKER_TAG: override_value(self.worker)}
                overrides = self.job_overrides(study, s, trial.params, tags, name)
                reason = self.infeasible(overrides)
            except Exception as exc:  # one trial's preparation failed (e.g. its dataset): that trial fails, no more
                error = f"{type(exc).__name__}: {exc}"[:2000]
                log.warning("trial %d failed before building: %s", trial.number, error)
                end_before_building(study, trial, TrialState.FAIL, "error", error, parent, progress)
                continue
            if reason:
                log.info("trial %d pruned before building: %s", trial.number, reason)
                end_before_building(study, trial, TrialState.PRUNED, "pruned_reason", reason, parent, progress)
                continue
            runnable.append((trial, overrides))
            launching[key] = trial
        return runnable, twins

    def reuse(self, study: optuna.Study, trial: optuna.Trial, source: optuna.trial.FrozenTrial) -> None:
        """A point the study has measured: tell Optuna its figures instead of building and measuring it again."""
        if source.state != TrialState.COMPLETE:
            error = f"same settings as trial {source.number}, which ended {source.state.name}"
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            return
        log.info(
            "trial %d: same settings as trial %d, reusing its figures (hydra.sweeper.allow_repeats=true measures "
            "again)",
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

    def infeasible(self, overrides: list[str]) -> str | None:
        """Compose the trial's config and run every check a run makes before building; return why it fails."""
        return sweeper_api.infeasible(self.compose(overrides))

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret: Any) -> None:
        state = study.get_trials(deepcopy=False)[trial.number].state
        if state != TrialState.RUNNING:  # another worker failed it: its heartbeat lapsed beyond the grace period
            log.warning(
                "trial %d was marked %s meanwhile (by another sweep on the study): not told", trial.number, state.name
            )
            if self.parent is not None:  # Optuna ran it again: its run here must not count as a result
                why = f"marked {state.name} in the study while it ran: its heartbeat lapsed, and it was run again"
                self.parent.fail_trial_runs(study.study_name, trial.number, why)
            return
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
        spread = {n: [figures[f"{n}_min"], figures[f"{n}_max"]] for n in self.s.objectives if f"{n}_min" in figures}
        if spread:
            trial.set_user_attr("spread", spread)
        missing = [name for name in self.s.objectives if name not in figures]
        if missing:
            trial.set_user_attr("error", f"figures {missing} were not recorded by this run")
            study.tell(trial, state=TrialState.FAIL)
            return
        for figure, (op, bound) in self.s.constraints.items():
            if figure in figures:
                trial.set_constraint(figure, constraint_violation(op, bound, figures[figure]))
            else:  # a GPU figure on a CPU run is absent: the constraint cannot be judged, so it does not bind
                log.warning("constraint on %s not applied to trial %d: the figure is absent", figure, trial.number)
        study.tell(trial, [figures[name] for name in self.s.objectives])

    def confirm_top_k(self, study: optuna.Study, s: SearchSettings, job_index: int, budget: Budget) -> None:
        """Measure the best k points again; the best is then chosen on the mean of both measurements."""
        k = self.settings["confirm_top_k"]
        if not k:
            return
        if budget.stopped:
            log.info("confirm_top_k skipped: the budget is spent")
            return
        if len(s.objectives) > 1:
            log.info("confirm_top_k skipped: it ranks one objective, this study has %d", len(s.objectives))
            return
        (name,) = s.objectives
        sign = -1 if s.objectives[name] == "maximize" else 1
        measured = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "reused_from" not in t.user_attrs and all(v <= 0 for v in t.constraints.values())  # feasible only
        ]
        confirmed = dict(study.user_attrs.get("confirmed", {}))
        top = [t for t in sorted(measured, key=lambda t: sign * t.value)[:k] if str(t.number) not in confirmed]
        if not top:
            return
        jobs = [
            self.job_overrides(study, s, t.params, {"optuna_confirm_of": t.number}, f"confirm trial {t.number}")
            for t in top
        ]
        returns = self.launch(jobs, job_index)
        for trial, ret in zip(top, returns):
            if ret.status != JobStatus.COMPLETED:
                log.warning("trial %d could not be confirmed: %s", trial.number, ret._return_value)
                continue
            again = sweeper_api.read_result(Path(ret.hydra_cfg.hydra.runtime.output_dir)).figures[name]
            confirmed[str(trial.number)] = {"first": trial.value, "again": again, "mean": (trial.value + again) / 2}
            log.info(
                "trial %d confirmed: %s %.4g, then %.4g (%+.1f%%)",
                trial.number,
                name,
                trial.value,
                again,
                100 * (again / trial.value - 1) if trial.value else 0.0,
            )
        study.set_user_attr("confirmed", confirmed)

    def check_failure_rate(self, study: optuna.Study, n_trials: int) -> None:
        """Stop once more than max_failure_rate of the planned trials crashed: the rest would likely crash too."""
        failed = tally(study).failed
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
        composed = self.compose(overrides)
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


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class Budget:
    """hydra.sweeper.budget_minutes: no batch is asked for once the next one would likely pass it."""

    def __init__(self, minutes: float | None, device: str, gpus_per_trial: int = 1):
        self.limit_s = None if minutes is None else minutes * 60
        self.device, self.gpus_per_trial = device, gpus_per_trial
        self.started = time.monotonic()
        self.batch_s = 0.0  # wall time of the launched batches: builds, loads and benchmarks
        self.job_s = 0.0  # the same per job: each job of a batch holds its slot (and its GPUs) until the batch ends
        self.batches = 0
        self.stopped = False

    def spent(self, seconds: float, jobs: int = 1) -> None:
        self.batch_s += seconds
        self.job_s += seconds * jobs
        self.batches += 1

    def allows_another_batch(self) -> bool:
        if self.limit_s is None or not self.batches:
            return True
        elapsed = time.monotonic() - self.started
        next_batch = self.batch_s / self.batches
        if elapsed + next_batch <= self.limit_s:
            return True
        self.stopped = True
        log.info(
            "budget: stopping after %.1f of %.1f minutes; the next batch would take about %.1f more",
            elapsed / 60,
            self.limit_s / 60,
            next_batch / 60,
        )
        return False

    def figures(self, job_s: float | None = None) -> dict[str, float]:
        """Wall minutes of this process; job minutes of `job_s` (all the session's workers) or else its own jobs."""
        job_minutes = (self.job_s if job_s is None else job_s) / 60
        return {
            "sweep.wall_minutes": (time.monotonic() - self.started) / 60,
            "sweep.job_minutes": job_minutes,
            # gpus_per_trial GPUs per job on a CUDA run, held for the whole job (build, load and benchmark)
            "sweep.gpu_minutes": job_minutes * self.gpus_per_trial if self.device == "cuda" else 0.0,
        }


def same_session(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["parent_run_id"], a["opened_by"]) == (b["parent_run_id"], b["opened_by"])


def worker_command(arguments: list[str], settings: dict[str, str]) -> list[str]:
    """This command line for a worker: the same arguments, with `settings` in place of any given for those keys."""
    kept = [a for a in arguments if a.split("=", 1)[0].lstrip("+~") not in settings]
    return [sys.executable, "-m", "sweep", *kept, *(f"{k}={override_value(v)}" for k, v in settings.items())]
