"""Shared test helpers. Everything here is real: Hydra, MLflow on SQLite or on a tracking server backed by
PostgreSQL, transformers on the tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import services

REPO = Path(__file__).resolve().parent.parent


def sweep_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `python -m sweep` under test: this checkout's code, offline, the default store."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return full_env


def run_sweep(workdir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m sweep ...` in `workdir` (its mlruns/, engines_cache/ and outputs/ land there)."""
    return subprocess.run(
        [sys.executable, "-m", "sweep", *overrides],
        cwd=workdir,
        env=sweep_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_sweep(workdir: Path, *overrides: str) -> subprocess.Popen:
    """`python -m sweep ...` in `workdir`, started and left running (stdout and stderr together, as text)."""
    command = [sys.executable, "-m", "sweep", *overrides]
    return subprocess.Popen(
        command, cwd=workdir, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def mlflow_runs(workdir: Path):
    """All runs in the default store under `workdir`, read back through MLflow's own client."""
    from mlflow.tracking import MlflowClient

    db = workdir / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments]) if experiments else []


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sweep.model.random_weights import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("checkpoints"), "tiny", "float32", seed=0, device="cpu")


# A sweep's quickest honest workload on the tiny model: a few short requests, one iteration.
QUICK = [
    "workload=throughput",
    "workload.num_requests=2",
    "workload.warmup_requests=0",
    "workload.iterations=1",
    "workload.input_len=8",
    "workload.output_len=4",
]


def cpu_config(checkpoint: Path, cache_dir: Path, *overrides: str):
    """An in-process engine test's config: the tiny checkpoint in fp32 on the CPU, short requests, nothing recorded."""
    from sweep.job.compose import compose

    base = [
        f"model.path={checkpoint}", f"cache_dir={cache_dir}", "tracker=none", "device=cpu", "engine.dtype=float32",
        "engine.max_seq_len=64", "workload.input_len=8", "workload.output_len=8",
    ]  # fmt: skip
    return compose(base + list(overrides))


def make_requests(lengths: list[int], output_len: int = 12, seed: int = 1):
    """Requests of the given prompt lengths with seeded token ids (clear of the tiny tokenizer's specials)."""
    import torch

    from sweep.workload.requests import Request

    gen = torch.Generator().manual_seed(seed)
    return [
        Request(f"r{i}", torch.randint(3, 250, (n,), generator=gen).tolist(), output_len) for i, n in enumerate(lengths)
    ]


# Shared stores on real servers. CI starts PostgreSQL and an MLflow server (tests/services.py) and says so in
# these variables; elsewhere the fixtures start their own once per session, or skip when PostgreSQL is missing.
POSTGRES_URL_ENV, MLFLOW_URL_ENV = "SWEEP_TEST_POSTGRES_URL", "SWEEP_TEST_MLFLOW_URL"
REQUIRE_SERVICES_ENV = "SWEEP_REQUIRE_SERVICES"  # "1" in CI: a missing server fails the test, never skips it


def no_service(why: str):
    if os.environ.get(REQUIRE_SERVICES_ENV) == "1":
        pytest.fail(f"{why}, and ${REQUIRE_SERVICES_ENV}=1 requires it", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def services_dir():
    """Where the session's own servers live: a fresh directory in /tmp that the `postgres` user can reach."""
    root = Path(tempfile.mkdtemp(prefix="sweep-test-services-"))
    yield root
    services.stop(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url(request) -> str:
    """A PostgreSQL server's URL to an admin database (a role that may create databases)."""
    if url := os.environ.get(POSTGRES_URL_ENV):
        return url
    try:
        return services.start_postgres(request.getfixturevalue("services_dir"))
    except services.ServiceUnavailable as exc:
        no_service(f"no PostgreSQL server for this test (${POSTGRES_URL_ENV} is unset): {exc}")


@pytest.fixture
def postgres_url(postgres_admin_url):
    """A fresh, empty database for this test alone: postgresql://USER:PW@127.0.0.1:PORT/<database>."""
    name = f"sweep_test_{uuid.uuid4().hex[:12]}"
    yield services.create_database(postgres_admin_url, name)
    services.drop_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def mlflow_server(request) -> str:
    """http://127.0.0.1:PORT of an MLflow tracking server backed by PostgreSQL, serving its artifacts. It is
    shared by the session: give each test a fresh experiment name."""
    if url := os.environ.get(MLFLOW_URL_ENV):
        return url
    admin_url = request.getfixturevalue("postgres_admin_url")
    backend_store = services.create_database(admin_url, f"mlflow_{uuid.uuid4().hex[:12]}")
    try:
        return services.start_mlflow(request.getfixturevalue("services_dir"), backend_store)
    except services.ServiceUnavailable as exc:
        no_service(f"no MLflow tracking server for this test (${MLFLOW_URL_ENV} is unset): {exc}")
