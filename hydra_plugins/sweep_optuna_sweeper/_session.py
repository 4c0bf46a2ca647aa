"""This process as one worker of a study, and the session its workers share.

Workers: any number of processes running the same command share the study (Optuna's distributed pattern). They
share one parent run through the study's *session* (a user attribute: the parent's id, opened by the first
process, closed by the last), and the study lock (_study.study_lock) makes counting and asking, opening and closing,
one process at a time. A worker whose heartbeat stops (kill -9, a lost node) has its trial failed, its run ended
FAILED, and the trial run again by another worker. `hydra.sweeper.workers=N` starts N such workers on this host.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._record import ParentRun
from hydra_plugins.sweep_optuna_sweeper._space import override_value
from hydra_plugins.sweep_optuna_sweeper._study import study_lock, tally
from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)
# The study's user attribute that holds its session: the parent run its workers share, and who opened it.
SESSION_ATTR = "session"
WORKER_ATTR = "worker"  # a trial's user attribute: the host:pid of the worker that asked for it


class Worker:
    """This process on the study: its name, the trials it runs, their retries when it or another worker dies."""

    def __init__(self) -> None:
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.storage: optuna.storages.RDBStorage | None = None  # the study's, once it is open
        self.parent: ParentRun | None = None  # the sweep's parent run, once the sweep runs
        self.running_here: set[int] = set()  # ids of the trials this process asked for and has not told yet

    def lock(self, study: optuna.Study) -> AbstractContextManager[None]:
        return study_lock(self.storage, study.study_name)

    def retry_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback for a trial whose worker stopped beating (killed, its node lost), which it failed."""
        worker = trial.user_attrs.get(WORKER_ATTR, "unknown")
        self.retry(study, trial, f"its worker ({worker}) stopped recording a heartbeat: failed by {self.name}")

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
            cause = f"its worker ({self.name}) stopped: {type(stopped_by).__name__}: {stopped_by}"
            self.retry(study, self.storage.get_trial(trial_id), cause[:500])
        self.running_here = set()

    # -- the session: one parent run for the study's workers -------------------------------------------------
    def new_session(self, parent_run_id: str | None, tracker: str | None) -> dict[str, Any]:
        # job_s: the seconds every worker of the session spent in its trials' jobs, added as each one leaves
        return {"parent_run_id": parent_run_id, "tracker": tracker, "opened_by": self.name, "job_s": 0.0}

    def open_or_join_parent(self, study: optuna.Study, tracker: str | None, start_parent: Callable[[], str]) -> str:
        """The parent run of the study's open session in this tracker, or a new one that opens the session.

        The study lock makes this the arbiter among workers that start at the same instant on different hosts.
        """
        with self.lock(study):
            session = study.user_attrs.get(SESSION_ATTR)
            if session and session["tracker"] == tracker and (run_id := session["parent_run_id"]):
                log.info("study %s: joining the parent run %s of its workers", study.study_name, run_id)
                return run_id
            run_id = start_parent()
            study.set_user_attr(SESSION_ATTR, self.new_session(run_id, tracker))
            return run_id

    def join_session(self, study: optuna.Study, tracker: str | None) -> dict[str, Any]:
        """The session this process works in: the one the multirun callback opened or joined, or a new one with
        this process's parent (none when untracked) if none is open."""
        with self.lock(study):
            session = study.user_attrs.get(SESSION_ATTR)
            if session is None:
                session = self.new_session(self.parent.run_id, tracker)
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


def same_session(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["parent_run_id"], a["opened_by"]) == (b["parent_run_id"], b["opened_by"])


def worker_command(arguments: list[str], settings: dict[str, str]) -> list[str]:
    """This command line for a worker: the same arguments, with `settings` in place of any given for those keys."""
    kept = [a for a in arguments if a.split("=", 1)[0].lstrip("+~") not in settings]
    return [sys.executable, "-m", "sweep", *kept, *(f"{k}={override_value(v)}" for k, v in settings.items())]


def run_workers(n: int, gpus_per_trial: int, sweep_dir: Path, study_name: str, storage_url: str) -> list[int]:
    """hydra.sweeper.workers=N: N copies of this command on this host, each a worker of the study on its own
    GPUs, with this sweep's parent run in their environment (like torchrun, not a scheduler). Waits for them and
    returns their exit codes."""
    groups = sweeper_api.gpu_groups(n, gpus_per_trial, "hydra.sweeper.workers")
    procs: list[subprocess.Popen] = []
    try:
        for i, gpus in enumerate(groups, start=1):
            out = sweep_dir / f"worker-{i}"
            command = worker_command(
                sys.argv[1:],
                {
                    "hydra.sweeper.workers": "1",
                    "hydra.sweeper.study_name": study_name,
                    "hydra.sweeper.storage": storage_url,
                    "hydra.sweep.dir": str(out),
                },
            )
            env = os.environ | {sweeper_api.WORKER_ENV: f"{i}/{n}"}
            if gpus is not None:
                env[sweeper_api.GPU_ENV] = gpus
            procs.append(subprocess.Popen(command, env=env))
            log.info("worker %d/%d: pid %d, GPUs %s, outputs in %s", i, n, procs[-1].pid, gpus, out)
        return [proc.wait() for proc in procs]
    finally:  # Ctrl-C or an error here: no worker outlives the sweep that started it
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
