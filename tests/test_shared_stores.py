"""Shared state for trials on many processes and machines, on real servers: the Optuna study on PostgreSQL, MLflow on
a tracking server backed by PostgreSQL that serves the artifacts, and one engine cache directory shared by
processes. The servers come from tests/conftest.py (`postgres_url`, `mlflow_server`). Nothing is faked."""

import json
import multiprocessing
import uuid
from urllib.parse import urlsplit

import optuna
import pytest
from conftest import QUICK, mlflow_runs, run_sweep, start_sweep
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState


def fresh_experiment() -> str:
    """Tests share the session's tracking server: each records into an experiment of its own."""
    return f"test-{uuid.uuid4().hex[:12]}"


def runs_of(url: str, experiment: str):
    client = MlflowClient(tracking_uri=url)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_run_is_recorded_on_the_tracking_server_with_its_artifacts_served(tmp_path, mlflow_server, tiny_checkpoint):
    experiment = fresh_experiment()
    result = run_sweep(
        tmp_path,
        *QUICK,
        f"model.path={tiny_checkpoint}",
        f"tracker.uri={mlflow_server}",
        f"tracker.experiment={experiment}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client, (run,) = runs_of(mlflow_server, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["workload.scenario"] == "throughput" and run.data.params["backend.name"] == "hf"
    assert run.data.metrics["output_throughput_tok_s"] > 0
    assert f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in result.stdout
    # served: the server keeps the artifacts (mlflow-artifacts:/), the client only uploads and downloads them
    assert urlsplit(run.info.artifact_uri).scheme == "mlflow-artifacts"
    assert {"config.yaml", "results.json", "requests.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    downloaded = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "download"))
    results = json.loads(open(downloaded).read())
    assert results["figures"]["output_throughput_tok_s"] == pytest.approx(
        run.data.metrics["output_throughput_tok_s"], rel=1e-4
    )
    assert not (tmp_path / "mlruns").exists()  # nothing went to the embedded store


def test_an_optuna_search_keeps_its_study_on_postgresql(tmp_path, postgres_url, mlflow_server, tiny_checkpoint):
    experiment = fresh_experiment()
    result = run_sweep(
        tmp_path,
        "-m",
        "search=throughput",
        *QUICK,
        f"model.path={tiny_checkpoint}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=shared",
        f"hydra.sweeper.storage={postgres_url}",
        f"hydra.sweeper.best_config_dir={tmp_path / 'best'}",
        f"tracker.uri={mlflow_server}",
        f"tracker.experiment={experiment}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    password = urlsplit(postgres_url).password
    assert password not in result.stdout + result.stderr  # the storage's URL is printed redacted

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(t.values[0] > 0 for t in study.trials)

    _, runs = runs_of(mlflow_server, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and [r.info.status for r in children] == ["FINISHED"] * 2
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1]
    assert not any(password in value for r in runs for value in r.data.params.values())
    assert not (tmp_path / "mlruns").exists()  # neither the study nor the runs went to the embedded stores


def test_a_study_storage_that_cannot_be_opened_is_one_line_naming_the_key(tmp_path, postgres_url):
    """A database the server does not have (a typo in the URL): refused before any trial, the password hidden."""
    missing = urlsplit(postgres_url)._replace(path="/no_such_database").geturl()
    result = run_sweep(tmp_path, "-m", "search=throughput", *QUICK, f"hydra.sweeper.storage={missing}", "tracker=none")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    port = urlsplit(postgres_url).port
    expected = f"hydra.sweeper.storage='postgresql://***@127.0.0.1:{port}/no_such_database' cannot be opened ("
    assert expected in output and 'database "no_such_database" does not exist' in output
    assert "Traceback" not in output and urlsplit(postgres_url).password not in output
    assert not list(tmp_path.glob("multirun/*/*/0"))  # no trial ran


def open_store_at_once(kind: str, url: str, start) -> None:
    """In a process of its own: create the store at `url`, at the same moment as the other processes."""
    from trackers.mlflow_tracker import MLflowTracker
    from trackers.store import store_lock

    start.wait()
    if kind == "mlflow":
        MLflowTracker(url, "sweep").start_run("r", {}).end("FINISHED")
    else:
        with store_lock(url):  # as the sweeper opens its study
            optuna.create_study(storage=url, study_name="s", load_if_exists=True)


@pytest.mark.parametrize("kind", ["mlflow", "optuna"])
def test_processes_creating_one_store_on_postgresql_at_once_all_succeed(postgres_url, kind):
    """Workers of one search start together on a fresh database: without the store lock, all but one of them
    fail on a duplicate key of PostgreSQL's catalog while creating the same tables."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=open_store_at_once, args=(kind, postgres_url, start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    if kind == "mlflow":
        client = MlflowClient(tracking_uri=postgres_url)
        runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"] * 3
    else:
        assert [s.study_name for s in optuna.get_all_study_summaries(postgres_url)] == ["s"]


def test_two_runs_on_one_shared_engine_cache_build_once(tmp_path, tiny_checkpoint):
    """Two `python -m sweep` processes, started together, in two working directories (two machines) on one cache
    directory (a shared filesystem): the compiled backend builds its engine (model load, warm-up) under the key's
    lock, so one run builds and the other reuses that build."""
    cache = tmp_path / "shared-cache"
    overrides = [*QUICK, f"model.path={tiny_checkpoint}", f"cache_dir={cache}", "backend=compiled"]
    overrides += ["engine.compile_mode=none", "engine.max_seq_len=64", "device=cpu"]
    workdirs = [tmp_path / "a", tmp_path / "b"]
    for workdir in workdirs:
        workdir.mkdir()
    procs = [start_sweep(workdir, *overrides) for workdir in workdirs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (first,), (second,) = (mlflow_runs(w) for w in workdirs)
    tags = [first.data.tags, second.data.tags]
    assert sorted(t["engine.cache_hit"] for t in tags) == ["False", "True"]
    assert tags[0]["engine.key"] == tags[1]["engine.key"]
    assert len(list(cache.glob(f"compiled/{tags[0]['engine.key']}/manifest.json"))) == 1
