"""What the sweeper reads off a study: which trials count towards n_trials, the best ones, and the heartbeat that
tells other workers this process's trials are alive."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Heartbeat:
    """Records a heartbeat for this sweep's running trials every interval, in a thread, while trials run.

    Optuna beats only inside study.optimize(); this sweeper asks and tells, so it beats itself, through the
    storage's public record_heartbeat. Another sweep's fail_stale_trials then fails only trials whose sweep died.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, interval: int):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def beat_for(self, trials: list[optuna.Trial]) -> None:
        ids = {t._trial_id for t in trials}  # Optuna's own heartbeat thread identifies a trial the same way
        for trial_id in ids:
            self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.trial_ids |= ids

    def stop_beating_for(self, trials: list[optuna.Trial]) -> None:
        with self.lock:
            self.trial_ids -= {t._trial_id for t in trials}

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a busy SQLite file: the next beat comes within the grace period
                    log.warning("heartbeat for trial id %d not recorded: %s", trial_id, exc)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join()


@dataclass
class Tally:
    counted: int  # trials that count towards n_trials
    running: list[optuna.trial.FrozenTrial]
    failed: list[optuna.trial.FrozenTrial]  # counted FAIL trials: crashes, not dead workers' trials run again


def tally(study: optuna.Study) -> Tally:
    """COMPLETE, PRUNED and FAIL trials count, less each FAIL that a retry replaced (a dead worker's trial, run
    again by another worker: the retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}  # RetryHeartbeatStaleTrialCallback's
    counted = [t for t in trials if t.state in FINISHED_STATES and t.number not in retried]
    return Tally(
        len(counted),
        [t for t in trials if t.state == TrialState.RUNNING],
        [t for t in counted if t.state == TrialState.FAIL],
    )


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best feasible trial (one objective), or the Pareto front (several), best first objective first.

    With confirmed trials (hydra.sweeper.confirm_top_k), one objective's best is the confirmed trial whose mean of
    both measurements is best.
    """
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    if len(study.directions) == 1:
        confirmed = study.user_attrs.get("confirmed", {})
        feasible = [t for t in complete if str(t.number) in confirmed and all(v <= 0 for v in t.constraints.values())]
        if feasible:
            sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
            return [min(feasible, key=lambda t: sign * confirmed[str(t.number)]["mean"])]
        try:
            return [study.best_trial]
        except ValueError:  # no feasible trial
            return []
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return sorted(study.best_trials, key=lambda t: -sign * t.values[0])
