"""Worker mode of the Optuna sweeper: several processes on one study in PostgreSQL, one MLflow server, one parent
run. Everything is real: PostgreSQL and an MLflow tracking server (conftest's postgres_url and mlflow_server),
Hydra, Optuna, transformers on the tiny model, and kill -9 of a worker's process group."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import QUICK, REPO, mlflow_runs, run_sweep
from optuna.distributions import CategoricalDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._session import worker_command
from hydra_plugins.sweep_optuna_sweeper._study import tally
from sweep.multirun.sweeper_api import STUDY_TAG, TRIAL_TAG, WORKER_TAG

GRID = ["engine.max_batch_size=choice(1,2)", "engine.attn_implementation=choice(eager,sdpa)"]
POINTS = {(b, a) for b in (1, 2) for a in ("eager", "sdpa")}


def search(tmp_path: Path, study: str, storage: str, tracker_uri: str | None, *extra: str) -> list[str]:
    """A 4-point grid on the tiny model, its study in `storage`, its runs in the experiment named after the study
    (on the tracking server at `tracker_uri`, else in the default store under the working directory)."""
    return [
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.best_config_dir={tmp_path / 'best'}",
        *([f"tracker.uri={tracker_uri}"] if tracker_uri else []),
        f"tracker.experiment={study}",
        *GRID,
        *extra,
    ]


SLOW = [  # about 6 s a trial, mostly waiting for arrivals: long enough to be stopped in the middle of one
    "workload=rate",
    "workload.request_rate=1",
    "workload.num_requests=6",
    "workload.warmup_requests=0",
    "workload.iterations=1",
    "workload.input_len=8",
    "workload.output_len=4",
]


def start_sweep(workdir: Path, *overrides: str) -> subprocess.Popen:
    """`python -m sweep ...` started in the background, in a process group of its own (to kill it whole)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "sweep", *overrides]
    return subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def running_trial_run(tracker_uri: str, experiment: str, worker: subprocess.Popen):
    """The MLflow run of a trial `worker` is running, once there is one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker_uri)
    tag = f"{socket.gethostname()}:{worker.pid}"
    while worker.poll() is None:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            running = client.search_runs(
                [found.experiment_id], f"tags.{WORKER_TAG} = '{tag}' and attributes.status = 'RUNNING'"
            )
            if running:
                return running[0]
        time.sleep(0.5)
    pytest.fail(f"the worker ran no trial: {worker.communicate()[0][-3000:]}")


def runs_of(tracker_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def point(trial) -> tuple:
    return trial.params["engine.max_batch_size"], trial.params["engine.attn_implementation"]


def test_two_workers_from_one_command_share_the_study_and_one_parent(tmp_path, postgres_url, mlflow_server):
    result = run_sweep(
        tmp_path, *search(tmp_path, "two", postgres_url, mlflow_server, "hydra.sweeper.workers=2", *QUICK)
    )
    assert result.returncode == 0, result.stderr[-3000:]

    study = optuna.load_study(study_name="two", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert {point(t) for t in study.trials} == POINTS  # every point measured exactly once
    assert study.user_attrs["session"] is None  # closed by the process that wrote the summary

    runs = runs_of(mlflow_server, "two")
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 5
    assert parent.data.params["optuna.workers"] == "2" and parent.data.metrics["trials.complete"] == 4
    assert parent.data.metrics["sweep.job_minutes"] > 0  # the workers' job time, added up in the study's session
    assert [r.info.status for r in children] == ["FINISHED"] * 4
    by_number = {t.number: t for t in study.trials}
    for run in children:  # each trial ran in the worker that asked for it, not in the process that started them
        trial = by_number[int(run.data.tags[TRIAL_TAG])]
        assert run.data.tags[STUDY_TAG] == "two" and run.data.tags[WORKER_TAG] == trial.user_attrs["worker"]
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert 1 <= len(workers) <= 2 and (tmp_path / "best" / "two.yaml").is_file()


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_run_again_by_the_other(
    tmp_path, postgres_url, mlflow_server
):
    """Two workers started by hand at the same instant (as on two nodes); kill -9 of one in the middle of a trial."""
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=5"]
    a, b = (start_sweep(tmp_path, *search(tmp_path, "killed", postgres_url, mlflow_server, *SLOW, *heartbeat))
            for _ in range(2))  # fmt: skip
    a_worker = f"{socket.gethostname()}:{a.pid}"
    try:
        running = running_trial_run(mlflow_server, "killed", a)  # A is in the middle of that trial
        os.killpg(a.pid, signal.SIGKILL)
        b_output = b.communicate(timeout=540)[0]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    assert b.returncode == 0, b_output[-3000:]
    killed_number = int(running.data.tags[TRIAL_TAG])

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    trials = {t.number: t for t in study.trials}
    killed = trials[killed_number]
    (retry,) = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker"] == a_worker
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["worker"] != a_worker  # the other worker ran it
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 5 and len(complete) == 4 and tally(study).counted == 4  # the retry counts, not the FAIL
    assert {point(t) for t in complete} == POINTS  # no point measured twice

    runs = runs_of(mlflow_server, "killed")
    parents = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # both workers joined one parent run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1 and not [r for r in runs if r.info.status == "RUNNING"]
    failed = [r for r in children if r.info.status == "FAILED"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert [int(r.data.tags[TRIAL_TAG]) for r in failed] == [killed_number]
    assert "stopped recording a heartbeat" in failed[0].data.tags["error"]
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in finished) == sorted(t.number for t in complete)
    assert parents[0].data.metrics["trials.complete"] == 4 and parents[0].data.metrics["trials.fail"] == 1


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        (["hydra.sweeper.workers=0"], {}, "hydra.sweeper.workers=0 is not allowed; it must be 1 or more"),
        # A fake GPU: this CPU machine is told one GPU is visible, so two workers of one GPU each cannot fit.
        (
            ["hydra.sweeper.workers=2"],
            {"CUDA_VISIBLE_DEVICES": "0"},
            "hydra.sweeper.workers=2 with 1 GPU(s) each needs 2 GPUs, and 1 are visible",
        ),
        (
            ["hydra.sweeper.workers=2", "hydra.sweeper.storage=mysql://db/optuna"],
            {},
            "hydra.sweeper.storage='mysql://db/optuna' is not allowed",
        ),
    ],
)
def test_a_bad_worker_setting_is_refused_before_anything_is_recorded(tmp_path, overrides, env, message):
    result = run_sweep(
        tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", *GRID, *QUICK, *overrides, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output and "Traceback" not in output, output[-3000:]
    assert mlflow_runs(tmp_path) == [] and not (tmp_path / "mlruns" / "optuna.db").exists()


def test_a_trial_run_again_for_a_dead_worker_counts_once(tmp_path):
    """n_trials counts COMPLETE, PRUNED and FAIL trials, but a dead worker's FAIL gives way to its retry."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    space = {"x": CategoricalDistribution([1, 2, 3])}
    study.tell(study.ask(space), 1.0)
    study.tell(study.ask(space), state=TrialState.FAIL)  # a crash: it counts
    dead = study.ask(space)
    storage.set_trial_state_values(dead._trial_id, TrialState.FAIL)  # as fail_stale_trials does
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(dead._trial_id))
    assert tally(study).counted == 2 and len(tally(study).failed) == 1
    retry = study.ask(space)  # the retry, waiting first in line
    assert retry.params == dead.params and [t.number for t in tally(study).running] == [retry.number]
    study.tell(retry, 2.0)
    assert tally(study).counted == 3


def test_a_worker_gets_the_same_command_with_its_own_settings():
    command = worker_command(
        ["-m", "search=throughput", "hydra.sweeper.workers=4", "+hydra.sweep.dir=x", "model.path=/m"],
        {
            "hydra.sweeper.workers": "1",
            "hydra.sweep.dir": "/out/worker-1",
            "hydra.sweeper.storage": "sqlite:////d/o.db",
        },
    )
    assert command[1:] == [
        "-m",
        "sweep",
        "-m",
        "search=throughput",
        "model.path=/m",
        "hydra.sweeper.workers=1",
        "hydra.sweep.dir=/out/worker-1",
        'hydra.sweeper.storage="sqlite:////d/o.db"',
    ]


def test_a_stopped_worker_gives_its_trial_back_at_once(tmp_path):
    """SIGTERM (a pre-empted job, like Ctrl-C): the trial it ran is failed and queued to run again at once, its run
    ended FAILED, instead of staying RUNNING until the grace period has passed (which the next start would wait for)."""
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracker_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    sweep = start_sweep(tmp_path, *search(tmp_path, "stopped", storage, None, *SLOW))
    try:
        running = running_trial_run(tracker_uri, "stopped", sweep)
        sweep.send_signal(signal.SIGTERM)
        output = sweep.communicate(timeout=120)[0]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode != 0
    stopped_number = int(running.data.tags[TRIAL_TAG])
    study = optuna.load_study(study_name="stopped", storage=storage)
    stopped = study.trials[stopped_number]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == stopped_number]
    assert stopped.state == TrialState.FAIL and retry.state == TrialState.WAITING, output[-3000:]
    (run,) = [r for r in runs_of(tracker_uri, "stopped") if r.info.run_id == running.info.run_id]
    assert run.info.status == "FAILED" and "stopped: KeyboardInterrupt: terminated by SIGTERM" in run.data.tags["error"]

    resumed = run_sweep(tmp_path, *search(tmp_path, "stopped", storage, None, *QUICK))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="stopped", storage=storage)
    assert study.trials[retry.number].state == TrialState.COMPLETE and tally(study).counted == 4
    assert {point(t) for t in study.trials if t.state == TrialState.COMPLETE} == POINTS
