"""What a run says it measured: the workload as it reached the engine (arrivals, ISL/OSL, the rate asked, offered
and achieved), and one warning line when the engine changes the workload. Real Hydra configs and the real CLI."""

from conftest import QUICK, mlflow_runs, run_sweep

from sweep.job.compose import compose
from sweep.measure.benchmark import engine_changes_workload
from sweep.measure.summary import summary_table, workload_header
from sweep.workload.requests import Request


def requests(*lengths: tuple[int, int]) -> list[Request]:
    return [Request(id=str(i), input_ids=[5] * isl, output_len=osl) for i, (isl, osl) in enumerate(lengths)]


def workload(*overrides: str):
    return compose(list(overrides)).workload


def test_the_header_names_the_rate_asked_offered_and_achieved_and_the_token_lengths():
    rate = workload("workload=rate", "workload.request_rate=8", "workload.iterations=3")
    figures = {"offered_rate_req_s": 9.213, "achieved_rate_req_s": 7.9}
    header = workload_header(rate, requests((32, 32), (32, 32)), 4, figures)
    assert header == (
        "rate: 8 req/s asked (burstiness 1), 9.21 offered, 7.90 achieved · ISL 32 / OSL 32 tokens · "
        "2 requests x 3 iterations"
    )
    mixed = requests((8, 16), (64, 16), (31, 2))
    assert "ISL 34.3 (8-64) / OSL 11.3 (2-16) tokens" in workload_header(rate, mixed, 4, {})
    assert workload_header(workload("workload=latency"), mixed, 1, {}).startswith("latency: one client, one request")
    everything = workload_header(workload("workload=throughput"), mixed, 8, {})
    assert everything.startswith("throughput: every request at t0, up to 8 at once")
    clients = workload("workload=concurrency", "workload.concurrency=4")
    assert workload_header(clients, mixed, 1, {}).startswith("concurrency: 4 clients, 1 served at once ·")
    assert workload_header(clients, mixed, 4, {}).startswith("concurrency: 4 clients ·")


def test_a_header_of_two_lines_sits_between_the_rules():
    table = summary_table("tiny · hf · cpu (float32) · batch 1\nlatency: one client", {"output_throughput_tok_s": 3})
    lines = table.splitlines()
    assert lines[1:3] == ["tiny · hf · cpu (float32) · batch 1", "latency: one client"]
    assert set(lines[0]) == set(lines[3]) == {"-"}


def test_more_clients_than_the_engine_serves_at_once_is_a_warning_and_nothing_else_is():
    clients = workload("workload=concurrency", "workload.concurrency=4")
    warning = engine_changes_workload(clients, 1, "engine.max_batch_size")
    assert warning == (
        "workload.concurrency=4 but the engine serves at most 1 request(s) at once (engine.max_batch_size=1): "
        "3 client(s) wait in its queue, so this measures concurrency 1; raise engine.max_batch_size to serve them all"
    )
    assert engine_changes_workload(clients, 4, "engine.max_batch_size") is None
    for scenario in ("latency", "throughput", "rate"):
        assert engine_changes_workload(workload(f"workload={scenario}"), 1, "engine.max_batch_size") is None


def test_a_run_whose_engine_serves_fewer_clients_warns_once_tags_it_and_says_so_in_its_header(tmp_path):
    quick = [o for o in QUICK if not o.startswith("workload=")]
    result = run_sweep(tmp_path, "workload=concurrency", "workload.concurrency=4", *quick)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "WARNING" in line and "workload.concurrency=4" in line]
    assert len(warnings) == 1 and "this measures concurrency 1" in warnings[0]
    assert "concurrency: 4 clients, 1 served at once · ISL 8 / OSL 4 tokens · 2 requests x 1 iterations" in output
    (run,) = mlflow_runs(tmp_path)
    assert run.data.tags["workload.changed"].startswith("workload.concurrency=4 but the engine serves at most 1")
