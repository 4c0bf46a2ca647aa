"""No password from a URI is written anywhere: not in a file under the working directory, not in a run's params,
tags, name or artifacts, not on the console. Real servers (tests/conftest.py): an MLflow tracking server backed by
PostgreSQL, reached through a URL that carries user info, and an Optuna study on PostgreSQL, whose URL carries the
database's password. The tracking server does not check the user info; it only has to travel with every request."""

import uuid
from pathlib import Path
from urllib.parse import urlsplit

from conftest import QUICK, run_sweep
from mlflow.tracking import MlflowClient

TRACKER_SECRET = "s3cr3t-tracker-pw"


def with_user_info(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.netloc}").geturl()


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)} holds {s!r}" for s in secrets if s.encode() in data]
    return found


def test_no_password_is_in_any_file_run_or_console_line(tmp_path, mlflow_server, postgres_url, tiny_checkpoint):
    experiment = f"test-{uuid.uuid4().hex[:12]}"
    tracker_uri = with_user_info(mlflow_server, "someone", TRACKER_SECRET)
    database_secret = urlsplit(postgres_url).password
    secrets = [TRACKER_SECRET, database_secret]
    common = [*QUICK, f"model.path={tiny_checkpoint}", f"tracker.uri={tracker_uri}", f"tracker.experiment={experiment}"]
    commands = {
        "single run": common,
        "grid": ["-m", *common, "engine.max_batch_size=1,2"],
        "search": ["-m", "search=throughput", *common, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=secret",
                   f"hydra.sweeper.storage={postgres_url}"],
    }  # fmt: skip
    for what, overrides in commands.items():
        result = run_sweep(tmp_path, *overrides)
        console = result.stdout + result.stderr
        assert result.returncode == 0, f"{what}: {console[-3000:]}"
        assert [s for s in secrets if s in console] == [], f"{what} printed a password: {console[-3000:]}"
        assert "://***@127.0.0.1" in console, what  # the run's link, printed without its user info

    # every file the three commands left: Hydra's config files of each job, logs, artifacts, the best config
    assert (tmp_path / "conf" / "best" / "secret.yaml").is_file()
    assert list(tmp_path.glob("multirun/*/*/0/.hydra/overrides.yaml"))
    assert files_holding(tmp_path, secrets) == []

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 + (1 + 2) + (1 + 2)  # a single run, a grid and a search, each parent with two children
    for run in runs:
        recorded = " ".join([run.info.run_name, *run.data.params.values(), *run.data.tags.values()])
        assert [s for s in secrets if s in recorded] == [], run.data
    downloads = tmp_path.parent / f"{tmp_path.name}-artifacts"
    for run in runs:
        client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
    assert any(p.name == "best_config.yaml" for p in downloads.rglob("*"))
    assert any(p.name == "sweeper.yaml" for p in downloads.rglob("*"))
    assert files_holding(downloads, secrets) == []
