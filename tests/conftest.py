"""Shared test helpers. Everything here is real: Hydra, MLflow on SQLite, transformers on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_sweep(workdir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m sweep ...` in `workdir` (its mlruns/, engines_cache/ and outputs/ land there)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "sweep", *overrides],
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
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
    from sweep.model import generate_tiny_checkpoint

    return generate_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"), seed=0)
