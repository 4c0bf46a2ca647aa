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
    from sweep.compose import compose

    base = [
        f"model.path={checkpoint}", f"cache_dir={cache_dir}", "tracker=none", "device=cpu", "engine.dtype=float32",
        "engine.max_seq_len=64", "workload.input_len=8", "workload.output_len=8",
    ]  # fmt: skip
    return compose(base + list(overrides))


def make_requests(lengths: list[int], output_len: int = 12, seed: int = 1):
    """Requests of the given prompt lengths with seeded token ids (clear of the tiny tokenizer's specials)."""
    import torch

    from sweep.workload import Request

    gen = torch.Generator().manual_seed(seed)
    return [
        Request(f"r{i}", torch.randint(3, 250, (n,), generator=gen).tolist(), output_len) for i, n in enumerate(lengths)
    ]
