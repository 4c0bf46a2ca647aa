"""Records name the model that ran: a local checkpoint (model.path) by its directory, in a grid's runs, a search's
trials, its study and its best config, and in the model.name every run records. Real CLI, Hydra, Optuna and MLflow
on SQLite, transformers on the tiny model."""

import shutil

import pytest
from conftest import QUICK, mlflow_runs, run_sweep


@pytest.fixture
def mymodel(tiny_checkpoint, tmp_path):
    """The tiny checkpoint in a directory of its own name, where the default model preset is `tiny`."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "mymodel")


def test_a_search_over_a_local_checkpoint_names_its_study_trials_and_best_config_after_it(tmp_path, mymodel):
    result = run_sweep(
        tmp_path,
        "-m",
        "search=goodput",
        f"model.path={mymodel}",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweeper.best_config_dir={tmp_path / 'best'}",
        *QUICK[1:],
        "workload.request_rate=50",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    (trial,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    study = parent.info.run_name
    assert study.startswith("goodput-mymodel-hf-"), study
    assert trial.info.run_name.startswith("trial 0: mymodel/hf max_batch_size="), trial.info.run_name
    assert trial.data.params["model.name"] == "mymodel" and trial.data.tags["model"] == "mymodel"
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"{study}.yaml"]


def test_a_grid_over_a_local_checkpoint_names_its_runs_after_it(tmp_path, mymodel):
    result = run_sweep(tmp_path, "-m", f"model.path={mymodel}", "engine.max_batch_size=choice(2)", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [r for r in mlflow_runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert job.info.run_name == "mymodel/hf max_batch_size=2"
    assert job.data.params["model.name"] == "mymodel"
