"""A multirun's job reuses the engine the job before left open when only the workload (or slo, objective, quality,
tracker) differs: real multiruns through the CLI, transformers and the compiled engine on the tiny model, MLflow on
SQLite."""

from conftest import mlflow_runs, run_sweep

RATES = ["workload=rate", "workload.request_rate=50,100", "workload.num_requests=4", "engine.max_batch_size=2"]


def by_job(workdir):
    """Every job's run, in the order the jobs ran, with its tags and figures."""
    runs = [r for r in mlflow_runs(workdir) if "engine.reused_open" in r.data.tags]
    return sorted(runs, key=lambda r: r.info.start_time)


def test_a_grid_loads_each_engine_once_and_the_records_say_which_jobs_reused_it(tmp_path):
    result = run_sweep(tmp_path, "-m", "backend=hf,compiled", *RATES)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = by_job(tmp_path)
    assert [(r.data.params["backend.name"], r.data.params["workload.request_rate"]) for r in runs] == [
        ("hf", "50.0"),
        ("hf", "100.0"),
        ("compiled", "50.0"),
        ("compiled", "100.0"),
    ]
    assert [r.data.tags["engine.reused_open"] for r in runs] == ["False", "True", "False", "True"]
    for loaded, reused in (runs[0:2], runs[2:4]):
        assert loaded.data.metrics["engine_cache_hit"] == 0.0 and loaded.data.metrics["phase_load_s"] > 0
        # The reusing job neither built nor loaded: its records say so, and it measured its own rate.
        assert reused.data.metrics["engine_cache_hit"] == 1.0 and reused.data.tags["engine.cache_hit"] == "True"
        assert reused.data.metrics["build_time_s"] == 0.0 and reused.data.metrics["phase_load_s"] == 0.0
        assert reused.data.metrics["offered_rate_req_s"] > loaded.data.metrics["offered_rate_req_s"]
        assert reused.data.tags["engine.key"] == loaded.data.tags["engine.key"]
    # What loading cost belongs to the job that loaded.
    assert "compile_and_warmup_s" in runs[2].data.metrics and "compile_and_warmup_s" not in runs[3].data.metrics
    log = result.stdout + result.stderr
    assert log.count("closing the hf engine left open by the job before") == 1
    assert "closing the compiled engine left open by the job before" in log  # at the multirun's end


def test_an_engine_is_not_reused_when_turned_off_or_when_the_quality_reference_needs_the_device(tmp_path):
    off = run_sweep(tmp_path, "-m", "backend=hf", "reuse_open_engine=false", *RATES)
    assert off.returncode == 0, off.stderr[-3000:]
    assert [r.data.tags["engine.reused_open"] for r in by_job(tmp_path)] == ["False", "False"]

    # A new prompt length needs a new quality reference, computed with the unquantized model on the run's device:
    # the open engine is closed first, and the job loads its own.
    longer = run_sweep(tmp_path, "-m", "backend=hf", "workload.input_len=8,12", "workload.output_len=4")
    assert longer.returncode == 0, longer.stderr[-3000:]
    runs = by_job(tmp_path)[2:]
    assert [r.data.tags["engine.reused_open"] for r in runs] == ["False", "False"]
    assert all("quality_kl" in r.data.metrics for r in runs)
