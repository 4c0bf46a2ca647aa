"""No run stays RUNNING once its processes are gone: SIGTERM ends a multirun's parent KILLED, kill -9 of a search is
reconciled at the next start through the heartbeat its processes record, and so is a dead run of another host.
Real processes, Hydra, Optuna and MLflow on SQLite, the tiny model."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import QUICK, mlflow_runs, start_sweep
from mlflow.tracking import MlflowClient

from trackers import store
from trackers.mlflow_tracker import MLflowTracker


def store_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


def wait_for_benchmark(workdir: Path, proc) -> None:
    """Until a run's engine is ready (its cache tag is set just before the benchmark starts)."""
    while proc.poll() is None:
        with store.store_lock(store_uri(workdir)):  # the run's process may be creating the store
            if any(r.info.status == "RUNNING" and "engine.cache_hit" in r.data.tags for r in mlflow_runs(workdir)):
                return
        time.sleep(0.2)


LONG = ["workload=throughput", "workload.num_requests=2000", "workload.output_len=32", "workload.iterations=1"]


def test_sigterm_ends_a_grids_parent_killed(tmp_path):
    proc = start_sweep(tmp_path, "-m", "engine.max_batch_size=1,2", *LONG)
    wait_for_benchmark(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED", output[-3000:]
    assert parent.data.tags["error"] == "KeyboardInterrupt: terminated by SIGTERM"
    assert [r.info.status for r in runs if r is not parent] == ["KILLED"]  # the second point never started


def test_a_search_killed_with_sigkill_is_ended_at_the_next_start_and_runs_again_when_resumed(
    tmp_path, tiny_checkpoint, monkeypatch
):
    search = ["-m", "search=throughput", f"model.path={tiny_checkpoint}", "hydra.sweeper.study_name=killed"]
    search += ["hydra.sweeper.n_trials=1", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    proc = start_sweep(tmp_path, *search, *LONG)
    wait_for_benchmark(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    # The search's parent is shared by the study's workers, so no one process owns it: its heartbeat tells that
    # they are gone. Two beats missed is the rule on this host; a beat every 0.5 s makes that one second here.
    monkeypatch.setattr(store, "HEARTBEAT_INTERVAL_S", 0.5)
    time.sleep(1.5)
    MLflowTracker(store_uri(tmp_path), "sweep")  # the next start
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path)}
    (parent,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    (trial,) = [r for r in runs.values() if r is not parent]
    assert parent.info.status == "KILLED" and parent.data.tags["sweep.orphaned"] == "true"
    assert "is gone, and none has since" in parent.data.tags["error"]
    assert trial.info.status == "KILLED" and "is gone" in trial.data.tags["error"]

    resumed = start_sweep(tmp_path, *search, *QUICK)  # the same study: it joins its parent again
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    again = MlflowClient(tracking_uri=store_uri(tmp_path)).get_run(parent.info.run_id)
    assert again.info.status == "FINISHED" and "error" not in again.data.tags
    assert again.data.tags["sweep.orphaned"] == "false"


def test_a_dead_run_of_another_host_is_ended_by_its_heartbeats_age(tmp_path):
    """Another host cannot be had here: these runs carry the tags its processes would have written."""
    uri = store_uri(tmp_path)
    tracker = MLflowTracker(uri, "sweep")
    now = time.time()
    elsewhere = {store.OWNER_HOST: "elsewhere", store.OWNER_PID: "4242", store.OWNER_STARTED: "1"}
    beats = {"dead": now - 2 * store.HEARTBEAT_STALE_S, "alive": now - 10}
    ids = {}
    for name, beat in beats.items():
        tags = elsewhere | {store.HEARTBEAT: f"{beat:.0f}", store.HEARTBEAT_BY: "elsewhere 4242 1"}
        ids[name] = tracker.client.create_run(tracker.experiment_id, run_name=name, tags=tags).info.run_id
    ids["unknown"] = tracker.client.create_run(tracker.experiment_id, run_name="unknown").info.run_id  # no tags

    MLflowTracker(uri, "sweep")  # the next start, on this host
    status = {name: tracker.client.get_run(run_id) for name, run_id in ids.items()}
    assert status["dead"].info.status == "KILLED"
    assert status["dead"].data.tags["error"] == (
        "ended KILLED by a later start: no process has recorded its heartbeat for 20 minutes (the last from pid "
        "4242 on elsewhere)"
    )
    assert status["alive"].info.status == "RUNNING" and status["unknown"].info.status == "RUNNING"


def test_a_live_run_keeps_recording_its_heartbeat_until_it_ends(tmp_path, monkeypatch):
    from trackers import mlflow_tracker

    monkeypatch.setattr(store, "HEARTBEAT_INTERVAL_S", 0.1)
    # A keeper of its own: the process's keeper may already sleep out the default minute from an earlier test.
    monkeypatch.setattr(mlflow_tracker, "HEARTBEAT_KEEPER", mlflow_tracker.HeartbeatKeeper())
    tracker = MLflowTracker(store_uri(tmp_path), "sweep")
    run = tracker.start_run("alive", {})
    first = tracker.client.get_run(run.run_id).data.tags[store.HEARTBEAT]
    assert tracker.client.get_run(run.run_id).data.tags[store.HEARTBEAT_BY] == store.this_process()
    deadline = time.monotonic() + 60
    while tracker.client.get_run(run.run_id).data.tags[store.HEARTBEAT] == first:
        assert time.monotonic() < deadline, "no heartbeat after the first"
        time.sleep(0.2)
    run.end("FINISHED")
    assert run.run_id not in mlflow_tracker.HEARTBEAT_KEEPER.runs
