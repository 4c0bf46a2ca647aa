"""The search loop: ask Optuna for a batch of trials, prune the infeasible ones, launch the rest, tell the results.

Each trial is a Hydra job (so any launcher runs it) and an MLflow child run of the sweep's parent run, which the
multirun callback (sweep.multirun.callback) opened. Everything the sweep could refuse is checked by `prepare`, which the
callback calls before it opens the parent run. The study lives in an RDB storage with Optuna's heartbeat, so a
sweep that is interrupted and started again continues where it stopped. Several processes may work on one study
(_session.py): each asks for its next trial as soon as it is free, while the trials that count and those running
elsewhere stay under `n_trials`, so the study ends with exactly `n_trials`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus, configure_log
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._budget import Budget
from hydra_plugins.sweep_optuna_sweeper._prepare import Prepared, SearchSettings, identity, prepare
from hydra_plugins.sweep_optuna_sweeper._record import (
    ParentRun,
    Progress,
    no_best_reason,
    write_best_config,
)
from hydra_plugins.sweep_optuna_sweeper._samplers import GRID
from hydra_plugins.sweep_optuna_sweeper._session import WORKER_ATTR, Worker, run_workers
from hydra_plugins.sweep_optuna_sweeper._space import overrides_for, settings_text, warm_start
from hydra_plugins.sweep_optuna_sweeper._study import (
    Heartbeat,
    StudySpec,
    best_trials,
    open_study,
    scores_nothing,
    tally,
)
from hydra_plugins.sweep_optuna_sweeper._trials import (
    end_before_building,
    job_overrides,
    point_key,
    reuse,
    tell_figures,
)
from hydra_plugins.sweep_optuna_sweeper.config import OptunaSweeperConf
from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)
# The heartbeat, metric names and several samplers are "experimental" in Optuna 5: used on purpose, so no warning
# per use. This sweeper drives the study with ask/tell and beats the heartbeat itself (class Heartbeat).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
WAIT_POLL_S = 2.0  # how often a worker with nothing left to ask looks at the trials other workers run


class OptunaSearch:
    def __init__(self, settings: OptunaSweeperConf):
        self.settings = settings
        self.worker = Worker()
        self.prepared: Prepared | None = None  # what prepare() resolved
        self.s: SearchSettings | None = None  # the search, once prepared

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def prepare(self, config: DictConfig, arguments: Sequence[str], config_loader: Any = None) -> SearchSettings:
        """Check everything a sweep could refuse, before the parent run and the first trial; ConfigError if not."""
        self.prepared = prepare(self.settings, config, arguments, config_loader)
        self.s = self.prepared.search
        return self.s

    def open_study(self, s: SearchSettings) -> optuna.Study:
        p = self.prepared
        spec = StudySpec(
            s.study_name, s.storage_url, s.objectives, s.space, p.sampler, self.settings.seed, identity(s, p.model_id)
        )
        st = self.settings
        storage, study = open_study(spec, st.heartbeat_interval, st.grace_period, self.worker.retry_stale_trial)
        self.worker.storage = storage
        return study

    def shared_parent_run_id(self, config: DictConfig, start_parent: Callable[[], str]) -> str:
        """The parent run of the study's open session in this tracker, or a new one that opens the session."""
        study = self.open_study(self.prepare(config, list(config.hydra.overrides.task)))
        return self.worker.open_or_join_parent(study, sweeper_api.tracker_location(config.tracker), start_parent)

    # -- the loop -------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        s = self.prepare(self.config, arguments, self.hydra_context.config_loader)
        st, worker = self.settings, self.worker
        study = self.open_study(s)
        parent = worker.parent = ParentRun(self.config)
        started_by = os.environ.get(sweeper_api.WORKER_ENV)  # "1/2": one of the workers another process started
        session = None
        if not started_by:
            session = worker.join_session(study, sweeper_api.tracker_location(self.config.tracker))
        if session is not None and session["opened_by"] == worker.name:
            parent.log_settings(st, self.prepared, study)
        if st.warm_start and self.prepared.sampler.name != GRID:
            with worker.lock(study):
                warm_start(study, s.space, s.fixed, self.compose)
        budget = Budget(st.budget_minutes, self.prepared.device, self.prepared.gpus_per_trial)
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
            results = self.run_workers(study) if st.workers > 1 else self.run_trials(study, s, budget)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the error being raised is what the user must see
                worker.give_back_trials(study, exc)
                worker.leave_session(study, budget.job_s, session)
            raise
        closed = worker.leave_session(study, budget.job_s, session)
        if closed is None:
            return results
        self.confirm_top_k(study, s, tally(study).counted, budget)
        parent.log_summary(s.objectives, study, budget, closed["job_s"])
        self.write_best_config(study, s, parent)
        return results

    def run_trials(self, study: optuna.Study, s: SearchSettings, budget: Budget) -> list:
        """Ask, launch and tell until the study holds n_trials counted trials and none runs elsewhere.

        Counting and asking happen under the study lock, so workers never ask past n_trials together. A worker
        with nothing left to ask waits for the trials other workers run: one of them may be a dead worker's,
        which it then fails (fail_stale_trials) and runs again.
        """
        worker = self.worker
        progress = Progress(s.n_trials, s.objectives)
        job_index = tally(study).counted
        results = []
        waiting = False
        with Heartbeat(worker.storage, self.settings.heartbeat_interval) as heartbeat:
            while True:
                with worker.lock(study):
                    optuna.storages.fail_stale_trials(study)
                    now = tally(study)
                    room = s.n_trials - now.counted - len(now.running)
                    batch = []
                    if room > 0 and budget.allows_another_batch():
                        batch = [study.ask(s.space) for _ in range(min(self.settings.n_jobs, room))]
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
                worker.running_here = {t._trial_id for t in batch}
                for trial in batch:  # a retried trial carries the dead worker's attribute until here
                    trial.set_user_attr(WORKER_ATTR, worker.name)
                runnable, twins = self.triage(study, s, batch, worker.parent, progress)
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
                    reuse(study, trial, study.trials[twin.number])
                    progress.line(study, trial)
                heartbeat.stop_beating_for(batch)
                worker.running_here = set()
                self.check_failure_rate(study, s.n_trials)
        return results

    def run_workers(self, study: optuna.Study) -> list:
        """hydra.sweeper.workers=N: N worker processes on this host (_session.run_workers); waits for them."""
        s, st = self.s, self.settings
        sweep_dir = Path(self.config.hydra.sweep.dir)
        codes = run_workers(st.workers, self.prepared.gpus_per_trial, sweep_dir, s.study_name, s.storage_url)
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
        slots = self.prepared.gpu_slots
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

    def triage(
        self, study: optuna.Study, s: SearchSettings, batch: list[optuna.Trial], parent: ParentRun, progress: Progress
    ) -> tuple[list[tuple[optuna.Trial, list[str]]], list[tuple[optuna.Trial, optuna.Trial]]]:
        """Which trials of a batch to launch; the others are reused, pruned or failed here, each told to Optuna."""
        repeats = self.settings.allow_repeats
        measured = {point_key(t.params): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        runnable: list[tuple[optuna.Trial, list[str]]] = []
        launching: dict[str, optuna.Trial] = {}
        twins = []
        for trial in batch:
            key = point_key(trial.params)
            if not repeats and key in measured:
                reuse(study, trial, measured[key])
                progress.line(study, trial)
                continue
            if not repeats and key in launching:
                twins.append((trial, launching[key]))
                continue
            name = f"trial {trial.number}: {self.what()} {settings_text(trial.params)}"
            try:
                tags = {sweeper_api.TRIAL_TAG: trial.number, sweeper_api.WORKER_TAG: self.worker.name}
                overrides = job_overrides(self.config, study, s, trial.params, tags, name)
                reason = sweeper_api.infeasible(self.compose(overrides))
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

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret: Any) -> None:
        state = study.get_trials(deepcopy=False)[trial.number].state
        if state != TrialState.RUNNING:  # another worker failed it: its heartbeat lapsed beyond the grace period
            log.warning(
                "trial %d was marked %s meanwhile (by another sweep on the study): not told", trial.number, state.name
            )
            if self.worker.parent is not None:  # Optuna ran it again: its run here must not count as a result
                why = f"marked {state.name} in the study while it ran: its heartbeat lapsed, and it was run again"
                self.worker.parent.fail_trial_runs(study.study_name, trial.number, why)
            return
        tell_figures(study, trial, ret, self.s)

    def confirm_top_k(self, study: optuna.Study, s: SearchSettings, job_index: int, budget: Budget) -> None:
        """Measure the best k points again; the best is then chosen on the mean of both measurements."""
        k = self.settings.confirm_top_k
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
            if "reused_from" not in t.user_attrs
            and all(v <= 0 for v in t.constraints.values())  # feasible only
            and not scores_nothing(t, study.directions)
        ]
        confirmed = dict(study.user_attrs.get("confirmed", {}))
        top = [t for t in sorted(measured, key=lambda t: sign * t.value)[:k] if str(t.number) not in confirmed]
        if not top:
            return
        jobs = [
            job_overrides(self.config, study, s, t.params, {"optuna_confirm_of": t.number}, f"confirm trial {t.number}")
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
        rate = self.settings.max_failure_rate
        if len(failed) > rate * n_trials:
            raise RuntimeError(
                f"{len(failed)} of {n_trials} planned trials failed, above hydra.sweeper.max_failure_rate={rate}; "
                f"last error: {failed[-1].user_attrs.get('error')}"
            )

    def write_best_config(self, study: optuna.Study, s: SearchSettings, parent: ParentRun) -> None:
        """The best trial as a config to rerun; none where no trial met the objective, saying what to loosen."""
        best = best_trials(study)
        if not best:
            log.warning("%s; no best config written", no_best_reason(study, s.objectives, s.constraints, self.config))
            return
        overrides = overrides_for(s.fixed, best[0].params, s.command_keys)
        choices = dict(self.compose(overrides).hydra.runtime.choices)
        write_best_config(study, best[0], choices, overrides, self.settings.best_config_dir, parent)
