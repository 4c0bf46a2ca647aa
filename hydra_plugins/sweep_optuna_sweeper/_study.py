"""The study in its storage: opening it (seeded, with the lock its workers share), which trials count towards
n_trials, the best ones, and the heartbeat that tells other workers this process's trials are alive."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._samplers import GRID, SamplerChoice, sampler_seed
from hydra_plugins.sweep_optuna_sweeper._space import enqueue_grid
from sweep.multirun import sweeper_api

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


def scores_nothing(trial: optuna.trial.FrozenTrial, directions: list[optuna.study.StudyDirection]) -> bool:
    """A trial whose every maximised objective is 0 met nothing (no request within the SLO, say): not a best."""
    maximised = [v for v, d in zip(trial.values, directions) if d == optuna.study.StudyDirection.MAXIMIZE]
    return bool(maximised) and all(v == 0 for v in maximised)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best feasible trial (one objective), or the Pareto front (several), best first objective first; none
    where every candidate scores nothing (scores_nothing).

    With confirmed trials (hydra.sweeper.confirm_top_k), one objective's best is the confirmed trial whose mean of
    both measurements is best.
    """
    directions = study.directions
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    if len(directions) == 1:
        confirmed = study.user_attrs.get("confirmed", {})
        feasible = [
            t
            for t in complete
            if str(t.number) in confirmed
            and all(v <= 0 for v in t.constraints.values())
            and not scores_nothing(t, directions)
        ]
        if feasible:
            sign = -1 if directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
            return [min(feasible, key=lambda t: sign * confirmed[str(t.number)]["mean"])]
        try:
            best = study.best_trial
        except ValueError:  # no feasible trial
            return []
        return [] if scores_nothing(best, directions) else [best]
    sign = 1 if directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    front = [t for t in study.best_trials if not scores_nothing(t, directions)]
    return sorted(front, key=lambda t: -sign * t.values[0])


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """One process of the study's workers at a time: counting and asking, opening and closing the session.

    SQLite: the file lock beside the database (one host). PostgreSQL: an advisory lock of this study alone, on a
    pooled connection of the storage, since it is taken at every ask (store_lock's locks the whole database, on
    a connection of its own); the server releases it when the holding connection dies, so a killed worker never
    keeps it.
    """
    if sweeper_api.sqlite_path(storage.url) is not None:
        with sweeper_api.store_lock(storage.url):
            yield
    else:
        with sweeper_api.advisory_lock(storage.engine, f"sweep-study:{study_name}"):
            yield


OPENINGS_ATTR = "openings"  # how many times the study was opened: each opening's sampler seed differs


@dataclass
class StudySpec:
    """What opening a study needs: the search's name, storage, objectives and space, and how it samples."""

    name: str
    storage_url: str
    objectives: dict[str, str]
    space: dict[str, Any]
    sampler: SamplerChoice
    seed: int | None
    identity: dict[str, Any]  # what the study was made for (the sweeper refuses to resume it for anything else)


def open_study(
    spec: StudySpec,
    heartbeat_interval: int,
    grace_period: int | None,
    on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    """The study, created or resumed, with its sampler seeded past the trials it already holds (sampler_seed).

    Each running trial's process records a heartbeat; a trial whose heartbeat stopped for the grace period (its
    process died) is failed by the next worker that looks (fail_stale_trials), which calls on_stale_trial.
    """
    with sweeper_api.store_lock(spec.storage_url):  # two sweeps creating the storage at once both migrate it
        storage = optuna.storages.RDBStorage(
            spec.storage_url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale_trial,
        )
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            directions=list(spec.objectives.values()),
            load_if_exists=True,
        )
    with study_lock(storage, spec.name):  # each opening takes its own number, so workers starting together differ
        opened_before = study.user_attrs.get(OPENINGS_ATTR, 0)
        study.set_user_attr(OPENINGS_ATTR, opened_before + 1)
        trials = len(study.get_trials(deepcopy=False))
    study.sampler = spec.sampler.make(sampler_seed(spec.seed, trials, opened_before))
    if "identity" not in study.user_attrs:
        study.set_user_attr("identity", spec.identity)
    study.set_metric_names(list(spec.objectives))  # optuna-dashboard shows the objectives by name
    if spec.sampler.name == GRID:
        with study_lock(storage, spec.name):  # workers starting together would each enqueue the grid
            enqueue_grid(study, spec.space, spec.seed)
    return storage, study
