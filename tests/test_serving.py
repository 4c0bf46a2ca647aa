"""Serving load: arrival processes, the request stream's clock, goodput and saturation, and figures recomputed
from a run's artifacts. Real Hydra, transformers on the tiny model and MLflow on SQLite; nothing is faked."""

import json
import math
import threading
import time

import numpy as np
import pytest
from conftest import mlflow_runs, run_sweep
from mlflow.tracking import MlflowClient

from sweep.config.errors import ConfigError
from sweep.job.artifacts import timings_from_artifacts
from sweep.job.compose import compose
from sweep.job.plan import make_plan
from sweep.measure.metrics import benchmark_figures, iteration_goodput, load_figures, meets_slo
from sweep.workload.requests import Request
from sweep.workload.stream import RequestStream, open_loop_offsets
from sweep.workload.timing import RequestTiming


# -- arrivals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate, burstiness", [(4.0, 1.0), (50.0, 0.5), (10.0, 4.0)])
def test_open_loop_gaps_have_the_requested_rate_and_burstiness(rate, burstiness):
    gaps = np.diff(open_loop_offsets(20001, rate, burstiness, seed=7))
    # Gamma(shape k, scale 1/(rate k)): mean 1/rate, coefficient of variation 1/sqrt(k). 20000 gaps: ~1% error.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_are_reproducible_from_the_seed():
    assert open_loop_offsets(50, 3.0, 1.0, seed=1) == open_loop_offsets(50, 3.0, 1.0, seed=1)
    assert open_loop_offsets(50, 3.0, 1.0, seed=1) != open_loop_offsets(50, 3.0, 1.0, seed=2)
    assert open_loop_offsets(5, math.inf, 1.0, seed=1) == [0.0] * 5


def requests(n: int) -> list[Request]:
    return [Request(f"r{i}", [1, 2, 3], 2) for i in range(n)]


def serve_by_hand(stream: RequestStream, limit: int, service_s: float, in_flight: list[int]) -> None:
    """A stand-in engine (stated: it sleeps instead of computing) that serves `limit` requests at a time."""
    while batch := stream.take(limit, wait=True):
        for r in batch:
            stream.admitted(r.id)
        in_flight.append(len(batch))
        time.sleep(service_s)
        for r in batch:
            stream.tokens(r.id, 2)
            stream.finished(r.id)


def test_open_loop_requests_are_not_available_before_they_arrive():
    stream = RequestStream(requests(3), offsets=[0.0, 0.05, 0.10])
    stream.start()
    assert [r.id for r in stream.take(10)] == ["r0"]
    assert stream.take(10) == []
    assert [r.id for r in stream.take(10, wait=True)] == ["r1"]  # blocks until its arrival
    assert time.perf_counter() - stream.t0 >= 0.05


def test_closed_loop_never_exceeds_its_clients_and_chains_each_client():
    stream = RequestStream(requests(9), clients=3)
    stream.start()
    in_flight: list[int] = []
    serve_by_hand(stream, limit=8, service_s=0.01, in_flight=in_flight)
    timings = stream.results()
    assert max(in_flight) <= 3
    # From the records alone: at every arrival, at most 3 requests have arrived and not finished.
    for t in timings:
        open_at = [u for u in timings if u.arrival <= t.arrival < u.token_times[-1]]
        assert len(open_at) <= 3
    assert sorted(t.arrival for t in timings)[3] >= min(t.token_times[-1] for t in timings)  # 4th waits for a finish


def test_requests_that_wait_for_a_busy_engine_record_their_queue_time():
    stream = RequestStream(requests(4), offsets=[0.0, 0.0, 0.0, 0.0])
    stream.start()
    serve_by_hand(stream, limit=1, service_s=0.02, in_flight=[])
    queues = sorted(t.queue for t in stream.results())
    assert queues[0] < 0.01 and queues[-1] >= 0.06  # the last one waited for three services


def test_a_stream_left_unserved_is_an_error():
    stream = RequestStream(requests(2), offsets=[0.0, 0.0])
    stream.start()
    stream.take(1)
    with pytest.raises(RuntimeError, match="unserved"):
        stream.results()


def test_the_stream_is_safe_across_threads():
    stream = RequestStream(requests(40), offsets=[i * 0.001 for i in range(40)])
    stream.start()
    workers = [threading.Thread(target=serve_by_hand, args=(stream, 2, 0.002, [])) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(stream.results()) == 40


# -- goodput ----------------------------------------------------------------------------------------------------
def timing(rid, arrival, times, iteration=0):
    return RequestTiming(rid, 4, len(times), arrival, times, iteration)


def test_goodput_by_hand():
    # Four requests over 2 s; SLO: TTFT <= 100 ms and TPOT <= 20 ms.
    a = timing("a", 0.0, [0.05, 0.06, 0.07])  # TTFT 50, TPOT 10: good
    b = timing("b", 0.5, [0.70, 0.71, 0.72])  # TTFT 200: bad
    c = timing("c", 1.0, [1.05, 1.10, 1.15])  # TPOT 50: bad
    d = timing("d", 1.5, [1.60, 1.61, 2.00])  # TTFT 100 (on the bound), TPOT 200: bad
    slo = {"ttft_ms": 100, "tpot_ms": 20}
    assert [meets_slo(t, slo) for t in (a, b, c, d)] == [True, False, False, False]
    assert meets_slo(d, {"ttft_ms": 100.0001})
    good = iteration_goodput([a, b, c, d], slo)
    assert good == pytest.approx({"goodput_req_s": 1 / 2.0, "goodput_tok_s": 3 / 2.0, "slo_attainment_pct": 25.0})
    assert benchmark_figures([a, b, c, d], {"e2e_ms": 250})["slo_attainment_pct"] == 75.0  # d takes 500 ms


# -- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("workload.request_rate=0", "workload.request_rate=0.0 is not allowed; it must be > 0"),
        ("workload.request_rate=-2", "workload.request_rate=-2.0 is not allowed; it must be > 0"),
        ("workload.concurrency=0", "workload.concurrency=0 is not allowed; it must be >= 1"),
        ("workload.burstiness=0", "workload.burstiness=0.0 is not allowed; it must be > 0"),
        ("workload.burstiness=nan", "workload.burstiness=nan is not allowed; it must be > 0"),
        ("slo.ttft_ms=0", "slo.ttft_ms=0.0 is not allowed; it must be > 0"),
        ("slo.tpot_ms=-1", "slo.tpot_ms=-1.0 is not allowed; it must be > 0"),
    ],
)
def test_bad_load_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(compose(["workload=rate", f"cache_dir={tmp_path}", override]))


def test_unknown_slo_preset_exits_non_zero_with_the_choices(tmp_path):
    result = run_sweep(tmp_path, "slo=fast")
    assert result.returncode != 0
    assert "slo" in result.stderr and "interactive" in result.stderr
    assert not (tmp_path / "mlruns").exists()


# -- a rate run end to end: every figure from the artifacts alone ---------------------------------------------------
def test_a_rate_run_records_arrivals_and_every_figure_can_be_recomputed_from_its_artifacts(tmp_path):
    result = run_sweep(
        tmp_path,
        "workload=rate",
        "workload.request_rate=30",
        "workload.num_requests=6",
        "workload.iterations=2",
        "workload.output_len=6",
        "engine.max_batch_size=2",
        "slo.ttft_ms=40",
        "slo.tpot_ms=5",
    )
    assert result.returncode == 0, result.stderr
    (run,) = mlflow_runs(tmp_path)
    metrics = run.data.metrics
    assert run.data.tags["scenario"] == "rate" and run.data.tags["saturated"] in ("True", "False")
    assert metrics["queue_ms_n"] == 12 and "goodput_req_s" in metrics and "offered_rate_req_s" in metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "download"))
    requests_text = open(f"{local}/requests.csv").read()
    timings = timings_from_artifacts(requests_text, open(f"{local}/token_times.jsonl").read())
    assert len(timings) == 12
    header = requests_text.splitlines()[0].split(",")
    assert {"arrival_s", "admitted_s", "first_token_s", "finish_s", "queue_ms"} <= set(header)
    recomputed = benchmark_figures(timings, {"ttft_ms": 40.0, "tpot_ms": 5.0}) | load_figures(timings)
    assert "achieved_rate_req_s" in recomputed
    logged = json.loads(open(f"{local}/results.json").read())["figures"]  # every digit; MLflow keeps 5
    for name, value in recomputed.items():
        assert logged[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    # The arrival schedule is the seeded one, reproducible: iteration 0's gaps are those of its seed.
    arrivals = sorted(t.arrival for t in timings if t.iteration == 0)
    assert np.allclose(arrivals, open_loop_offsets(6, 30.0, 1.0, seed=0 + 1000), atol=1e-9)
    results = json.loads(open(f"{local}/results.json").read())
    assert results["figures"]["goodput_req_s"] == pytest.approx(metrics["goodput_req_s"], rel=1e-4)


# -- load sweeps and the max-rate search ----------------------------------------------------------------------------
def test_a_load_sweep_gives_one_parent_with_the_latency_throughput_curve(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "workload=rate",
        "workload.request_rate=5,20,80",
        "workload.num_requests=4",
        "workload.iterations=1",
        "workload.output_len=4",
        "slo=batch",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(float(r.data.params["workload.request_rate"]) for r in children) == [5.0, 20.0, 80.0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert "report/load_curve.png" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]


def capacity_stand_in(capacity: float):
    """A stand-in backend of known capacity (stated: no engine runs): SLO attainment is 100% up to `capacity`
    req/s; past it the queue grows without bound and at most half the requests meet the SLO."""
    return lambda rate: 100.0 if rate <= capacity else 50.0 * capacity / rate


@pytest.mark.parametrize("capacity, start", [(13.0, 1.0), (0.3, 4.0), (700.0, 1.0)])
def test_the_max_rate_search_finds_a_known_capacity_within_its_tolerance_and_budget(capacity, start):
    from hydra_plugins.sweep_max_rate_sweeper._impl import Probe, max_sustainable, next_rate

    attainment = capacity_stand_in(capacity)
    probes, budget, tolerance = [], 16, 0.05
    while len(probes) < budget and (rate := next_rate(probes, start, tolerance, max_rate=1024)) is not None:
        probes.append(Probe(rate, attainment(rate), attainment(rate) >= 99.0))
    answer = max_sustainable(probes)
    assert capacity * (1 - tolerance) <= answer <= capacity
    assert len(probes) <= budget


def test_max_rate_search_end_to_end_logs_the_answer_on_the_parent(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "search=max_rate",
        "slo.e2e_ms=60000",
        "workload.num_requests=3",
        "workload.iterations=1",
        "workload.output_len=4",
        "hydra.sweeper.start_rate=50",
        "hydra.sweeper.max_rate=200",
        "hydra.sweeper.max_probes=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "max_rate"]
    probes = sorted(float(r.data.params["workload.request_rate"]) for r in runs if r is not parent)
    assert probes == [50.0, 100.0, 200.0]  # every rate held under a 60 s SLO: doubling up to max_rate
    names = sorted(r.info.run_name for r in runs if r is not parent)
    assert names == ["probe 1: rate=50", "probe 2: rate=100", "probe 3: rate=200"]
    assert parent.data.metrics["max_sustainable_rate_req_s"] == 200.0


def test_max_rate_search_without_an_slo_is_refused_before_anything_is_recorded(tmp_path):
    result = run_sweep(tmp_path, "-m", "search=max_rate")
    assert result.returncode == 2
    assert "search=max_rate judges each rate by one; set slo=interactive" in result.stdout + result.stderr
    assert mlflow_runs(tmp_path) == []
