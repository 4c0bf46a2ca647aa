"""Trials in parallel: submitit's local launcher with each trial pinned to its GPUs, and the SLURM preset.

The machine running these tests has no GPU: the GPUs are a CUDA_VISIBLE_DEVICES list given to the sweep (the
sweeper hands out groups of it, the jobs run on the CPU), and SLURM is a stand-in `sbatch` that keeps the script
it is given. Everything else is real: Hydra, hydra-submitit-launcher, submitit, Optuna and MLflow on SQLite.
"""

import os
import stat

import optuna
import pytest
from conftest import QUICK, mlflow_runs, run_sweep
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._prepare import check_numbers, gpu_slots
from hydra_plugins.sweep_optuna_sweeper.config import OptunaSweeperConf
from sweep.config import CONF_DIR
from sweep.config.errors import ConfigError
from sweep.job.artifacts import RESULT_FILE
from sweep.job.compose import register_configs

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
RAY = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
PARALLEL_SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    "hydra.sweeper.sampler=grid",  # two different points: neither trial is a repeat the sweeper would reuse
    "hydra.sweeper.n_trials=2",
    "hydra.sweeper.n_jobs=2",
    "hydra.sweeper.gpus_per_trial=2",
    "hydra.sweeper.study_name=parallel",
    *QUICK,
    "engine.max_batch_size=choice(1,2)",
]


def test_a_batch_runs_at_once_in_processes_of_its_own_each_pinned_to_its_gpus(tmp_path):
    result = run_sweep(
        tmp_path, *PARALLEL_SEARCH, "hydra/launcher=submitit_local", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    )
    assert result.returncode == 0, result.stderr[-3000:]

    trials = optuna.load_study(study_name="parallel", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    children = {int(r.data.tags["optuna_trial"]): r for r in runs if r.info.run_id != parent.info.run_id}
    assert sorted(children) == [0, 1]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    assert parent.data.params["optuna.gpus_per_trial"] == "2"

    # job i of the batch got GPU group i; each recorded what its own process saw
    assert {n: r.data.tags["env.cuda_visible_devices"] for n, r in children.items()} == {0: "0,1", 1: "2,3"}
    assert len({r.data.tags["env.pid"] for r in children.values()}) == 2

    # At once: both jobs had started (Hydra writes a job's config as the job begins) before either wrote its
    # result; one after the other, the second would start only after the first's result.
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    jobs = [d for d in sweep_dir.iterdir() if (d / RESULT_FILE).is_file()]
    assert len(jobs) == 2
    started = max((d / ".hydra" / "config.yaml").stat().st_mtime for d in jobs)
    assert all(started < (d / RESULT_FILE).stat().st_mtime for d in jobs)

    # submitit's pickles hold each job's config (a URI's password with it): gone once the sweep ends; its logs stay
    assert len([d for d in (sweep_dir / ".submitit").iterdir() if d.name != "%j"]) == 2
    assert list((sweep_dir / ".submitit").rglob("*.pkl")) == [] and list((sweep_dir / ".submitit").rglob("*.out"))


def test_more_parallel_trials_than_the_gpus_hold_are_refused_before_anything_runs(tmp_path):
    result = run_sweep(
        tmp_path, *PARALLEL_SEARCH, "hydra/launcher=submitit_local", env={"CUDA_VISIBLE_DEVICES": "0,1,2"}
    )
    assert result.returncode == 2
    assert (
        "hydra.sweeper.n_jobs=2 with 2 GPU(s) each needs 4 GPUs, and 3 are visible (CUDA_VISIBLE_DEVICES=0,1,2); "
        "allowed: hydra.sweeper.n_jobs <= 1, or a smaller hydra.sweeper.gpus_per_trial (now 2)"
    ) in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and mlflow_runs(tmp_path) == []
    assert not list((tmp_path / "multirun").glob("*/*/.submitit"))  # no job was started


def hydra_config(*overrides: str):
    """The full config of `python -m sweep -m <overrides>`, Hydra's own part included (launcher, sweeper)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["hydra/sweeper=optuna", *overrides], return_hydra_config=True)


def test_which_launchers_the_sweeper_pins_and_which_it_refuses(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    local = hydra_config("hydra/launcher=submitit_local")
    assert gpu_slots(local, 3, 2, "cuda") == ["0,1", "2,3", "4,5"]
    assert gpu_slots(local, 2, 4, "cuda") == ["0,1,2,3", "4,5,6,7"]
    assert gpu_slots(hydra_config(), 4, 1, "cuda") is None  # the basic launcher: one job at a time, in-process
    assert gpu_slots(hydra_config("hydra/launcher=slurm"), 64, 1, "cuda") is None  # SLURM allocates the GPUs

    with pytest.raises(ConfigError, match="hydra.launcher.gpus_per_node=1 is not allowed with hydra/launcher="):
        gpu_slots(hydra_config("hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=1"), 2, 1, "cuda")

    # hydra-joblib-launcher and hydra-ray-launcher are not dependencies: the part of their config the sweeper reads
    joblib = OmegaConf.create({"hydra": {"launcher": {"_target_": JOBLIB}, "runtime": {"choices": {}}}})
    joblib.hydra.runtime.choices["hydra/launcher"] = "joblib"
    with pytest.raises(
        ConfigError, match="hydra/launcher=joblib with device=cuda is not allowed: it reuses its worker"
    ):
        gpu_slots(joblib, 2, 1, "cuda")
    assert gpu_slots(joblib, 2, 1, "cpu") is None  # no CUDA in a trial: nothing to keep apart
    ray = OmegaConf.create({"hydra": {"launcher": {"_target_": RAY, "ray": {"init": {}, "remote": {}}}}})
    with pytest.raises(ConfigError, match="hydra.launcher.ray.remote.num_gpus is not set"):
        gpu_slots(ray, 2, 1, "cuda")
    ray.hydra.launcher.ray.remote.num_gpus = 2
    assert gpu_slots(ray, 2, 2, "cuda") is None  # Ray gives each task its GPUs

    with pytest.raises(ConfigError, match=r"hydra.sweeper.gpus_per_trial=0 is not allowed"):
        check_numbers(OptunaSweeperConf(sampler="tpe", gpus_per_trial=0))


STAND_IN_SBATCH = """#!/bin/sh
# A stand-in for SLURM's sbatch: keeps the script it is given and refuses it, so that nothing waits for a cluster.
cp "$1" "$SBATCH_SCRIPT_COPY"
echo "sbatch: error: no cluster here (stand-in)" >&2
exit 1
"""


def test_the_slurm_preset_submits_a_batch_as_one_array_with_gpus_partition_time_and_setup(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": STAND_IN_SBATCH, "srun": "#!/bin/sh\nexit 1\n"}.items():  # srun: never run
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    script = tmp_path / "submitted.sh"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_SCRIPT_COPY": str(script)}
    result = run_sweep(tmp_path, *PARALLEL_SEARCH, "hydra/launcher=slurm", "hydra.launcher.partition=gpu-h200", env=env)
    assert result.returncode != 0 and "no cluster here" in result.stderr + result.stdout  # submitted, refused
    lines = script.read_text().splitlines()
    assert {
        "#SBATCH --array=0-1%2",  # the batch of n_jobs=2 trials, both at once
        "#SBATCH --gpus-per-node=2",  # hydra.sweeper.gpus_per_trial
        "#SBATCH --partition=gpu-h200",
        "#SBATCH --time=120",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        f". {os.environ.get('VIRTUAL_ENV', tmp_path / '.venv')}/bin/activate",
        f"cd {tmp_path}",
    } <= set(lines)
    # the setup lines come before the trial's command
    assert lines.index(f"cd {tmp_path}") < next(i for i, line in enumerate(lines) if line.startswith("srun "))
