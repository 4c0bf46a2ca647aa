"""A multirun's set-up errors are refused before anything is recorded (one line, exit 2, no parent run, no job),
and a max-rate search stopped early keeps what it found. Real processes, Hydra, MLflow on SQLite and the tiny
model."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import mlflow_runs, run_sweep, start_sweep

MAX_RATE = ["-m", "search=max_rate", "slo=interactive"]
REFUSED = [
    (["hydra.sweeper.attainment=150"], "hydra.sweeper.attainment=150.0 is not allowed; it must be a percentage in (0"),
    (["hydra.sweeper.start_rate=0"], "hydra.sweeper.start_rate=0.0 is not allowed; it must be a finite number > 0"),
    (["hydra.sweeper.max_probes=0"], "hydra.sweeper.max_probes=0 is not allowed; it must be 1 or more"),
    (["hydra.sweeper.tolerance=-1"], "hydra.sweeper.tolerance=-1.0 is not allowed; it must be a fraction in (0, 1)"),
    (
        ["hydra.sweeper.start_rate=8", "hydra.sweeper.max_rate=4"],
        "hydra.sweeper.max_rate=4.0 is not allowed; it must be finite and >= hydra.sweeper.start_rate=8.0",
    ),
    (["engine.max_batch_size=1,2"], "engine.max_batch_size=1,2 is not allowed with search=max_rate"),
    # every probe would have this config error: refused once, up front, instead of a KeyError after the first probe
    (["engine.max_input_len=16"], "engine.max_input_len=16 cannot hold the workload's longest input (32 tokens)"),
]


def assert_refused_before_anything(tmp_path: Path, result, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert len([line for line in output.splitlines() if message in line]) == 1, output[-3000:]
    assert "Traceback" not in output and "KeyError" not in output
    assert mlflow_runs(tmp_path) == []  # no parent run, no probe
    assert not list(tmp_path.glob("multirun/*/*/0"))


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_max_rate_search_that_cannot_run_is_refused_before_its_parent_run(tmp_path, overrides, message):
    assert_refused_before_anything(tmp_path, run_sweep(tmp_path, *MAX_RATE, *overrides), message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["search=goodput", "slo=none"], "objective.metric='goodput_req_s' is recorded only under an SLO"),
        (
            ["objective.metric=achieved_rate_req_s", "engine.max_batch_size=1,2"],
            "objective.metric='achieved_rate_req_s' is recorded only by an open loop (workload=rate at a finite",
        ),
    ],
    ids=["search=goodput slo=none", "achieved rate on workload=latency"],
)
def test_a_sweep_whose_objective_its_runs_cannot_record_is_refused(tmp_path, overrides, message):
    assert_refused_before_anything(tmp_path, run_sweep(tmp_path, "-m", *overrides), message)


def wait_for_probe(workdir: Path, proc, finished: int) -> None:
    """Until `finished` probes have ended FINISHED and the next one is benchmarking (its cache tag is set just
    before the benchmark starts)."""
    from trackers.store import store_lock

    while proc.poll() is None:
        with store_lock(f"sqlite:///{workdir}/mlruns/mlflow.db"):
            children = [r for r in mlflow_runs(workdir) if "mlflow.parentRunId" in r.data.tags]
        done = [r for r in children if r.info.status == "FINISHED"]
        if len(done) >= finished and any(
            r.info.status == "RUNNING" and "engine.cache_hit" in r.data.tags for r in children
        ):
            return
        time.sleep(0.2)


def test_a_stopped_max_rate_search_keeps_its_bracket_as_a_partial_answer(tmp_path):
    # every rate holds under a 60 s SLO: the search doubles 1, 2, 4 ...; SIGTERM lands in the second probe
    proc = start_sweep(
        tmp_path, "-m", "search=max_rate", "slo.e2e_ms=60000", "workload.num_requests=6", "workload.iterations=2",
        "workload.warmup_requests=0", "workload.output_len=8", "hydra.sweeper.start_rate=1",
    )  # fmt: skip
    wait_for_probe(tmp_path, proc, finished=1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    probes = sorted((float(r.data.params["workload.request_rate"]), r.info.status) for r in runs if r is not parent)
    assert probes == [(1.0, "FINISHED"), (2.0, "KILLED")], output[-3000:]
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "KeyboardInterrupt: terminated by SIGTERM"
    assert parent.data.tags["max_rate.partial"] == "true"
    assert parent.data.metrics["max_sustainable_rate_req_s"] == 1.0 and parent.data.metrics["max_rate.probes"] == 1
    assert (
        "max-rate search stopped (KeyboardInterrupt: terminated by SIGTERM) after 1 probes: held at 1 req/s" in output
    )
