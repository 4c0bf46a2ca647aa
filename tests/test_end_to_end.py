"""`python -m sweep` end to end on the tiny model: real Hydra, transformers, and MLflow on SQLite."""

import json

import pandas as pd
import pytest
from conftest import mlflow_runs, run_sweep
from mlflow.tracking import MlflowClient

from sweep.backends.hf.backend import HFBackend
from sweep.job.compose import compose


def artifact_paths(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_main_job_records_a_complete_run_then_reuses_the_engine(tmp_path):
    first = run_sweep(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tiny · hf · cpu (float32) · batch 1\nlatency: one client, one request at a time" in first.stdout
    assert "output throughput" in first.stdout
    run_line = next(line for line in first.stdout.splitlines() if line.startswith("run "))
    assert "/#/experiments/1/runs/" in run_line and "workflowType=machine_learning" in run_line

    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["engine.max_batch_size"] == "1" and params["model.name"] == "tiny"
    assert params["workload.scenario"] == "latency" and params["backend.name"] == "hf"
    assert "gemm_plugin" in params["engine.ignored_options"] and "max_seq_len" not in params["engine.ignored_options"]
    for name in (
        "ttft_ms_p50",
        "ttft_ms_p99",
        "tpot_ms_p95",
        "itl_ms_mean",
        "e2e_latency_ms_p90",
        "output_throughput_tok_s",
        "output_throughput_tok_s_min",
        "request_throughput_req_s",
        "host_peak_rss_gb",
        "build_time_s",
        "model_bytes",
        "kv_bytes_per_token",
    ):
        assert name in metrics, name
    assert metrics["output_throughput_tok_s"] > 0
    assert metrics["ttft_ms_n"] == 4 * 3  # 4 requests x 3 iterations; warm-up excluded
    assert not any(k.startswith(("gpu_", "energy", "torch_max")) for k in metrics)  # absent on a CPU, never 0
    assert tags["backend"] == "hf" and tags["model"] == "tiny" and tags["engine.cache_hit"] == "False"
    assert tags["env.transformers"] and tags["env.torch"]
    assert "sweep.git_commit" not in tags  # once, as env.sweep_git_commit
    assert run.info.run_name == "tiny/hf" and run.info.run_id in run_line

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "results.json", "requests.csv", "engine/manifest.json", "logs/sweep.log"} <= set(artifacts)
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "download"))
    requests = pd.read_csv(f"{local}/requests.csv")
    assert len(requests) == 12 and (requests["output_len"] == 32).all()
    results = json.loads(open(f"{local}/results.json").read())
    # MLflow keeps 5 significant digits of a non-integer figure; results.json keeps every digit
    assert results["figures"]["output_throughput_tok_s"] == pytest.approx(metrics["output_throughput_tok_s"], rel=1e-4)
    manifest = json.loads(open(f"{local}/engine/manifest.json").read())
    assert manifest["artifact"] == "none" and manifest["backend"] == "hf"

    second = run_sweep(tmp_path)
    assert second.returncode == 0, second.stderr
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path)}
    (again,) = [r for rid, r in runs.items() if rid != run.info.run_id]
    assert again.data.tags["engine.cache_hit"] == "True"
    assert again.data.metrics["build_time_s"] == 0.0
    assert again.data.tags["engine.key"] == tags["engine.key"]


def test_throughput_multirun_gives_one_run_per_job(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "workload=throughput",
        "workload.num_requests=4",
        "workload.iterations=1",
        "workload.output_len=8",
        "engine.max_batch_size=1,2,4",
    )
    assert result.returncode == 0, result.stderr
    runs = [r for r in mlflow_runs(tmp_path) if "sweep.kind" not in r.data.tags]  # the jobs, not their parent
    assert sorted(int(r.data.params["engine.max_batch_size"]) for r in runs) == [1, 2, 4]
    assert all(r.info.status == "FINISHED" for r in runs)
    # hf builds nothing: one cache entry per model, dtype and device, whatever max_batch_size says
    assert len({r.data.tags["engine.key"] for r in runs}) == 1
    assert sorted(r.data.tags["engine.cache_hit"] for r in runs) == ["False", "True", "True"]
    for r in runs:
        assert r.data.metrics["ttft_ms_n"] == 4 and r.data.metrics["output_tokens"] == 32


def compose_config(tmp_path, *overrides):
    return compose(
        [
            f"tracker.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            f"cache_dir={tmp_path}/engines_cache",
            "workload.iterations=1",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    "error, status", [(RuntimeError("CUDA out of memory"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_run_that_breaks_is_never_left_running(tmp_path, monkeypatch, error, status):
    from sweep import run

    def broken_generate(self, requests):
        raise error

    monkeypatch.setattr(HFBackend, "generate", broken_generate)  # the break is faked; the rest is real
    with pytest.raises(type(error)):
        run(compose_config(tmp_path))
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == status
    assert run.data.tags["error"].startswith(type(error).__name__)


def test_dataset_workload_runs_with_variable_lengths(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"task_id": i, "prompt": "benchmark " * (i + 1), "output_tokens": 3 + i}) for i in range(3)
        )
    )
    from sweep import run

    result = run(
        compose_config(
            tmp_path,
            "workload=throughput",
            f"workload.dataset={data}",
            "workload.num_requests=3",
            "workload.warmup_requests=0",
            "engine.max_batch_size=2",
        )
    )
    (recorded,) = mlflow_runs(tmp_path)
    assert recorded.info.status == "FINISHED" and recorded.info.run_id == result.run_id
    assert result.objective == pytest.approx(recorded.data.metrics["output_throughput_tok_s"], rel=1e-4)
    assert recorded.data.metrics["output_tokens"] == result.figures["output_tokens"] == 3 + 4 + 5
    assert not result.cache_hit and result.plan.backend.name == "hf" and len(result.timings) == 3


def test_a_local_checkpoint_goes_through_the_same_loading_path(tmp_path, tiny_checkpoint):
    from sweep import run

    run(compose_config(tmp_path, f"model.path={tiny_checkpoint}", "workload.num_requests=1"))
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["model"] == tiny_checkpoint.name
    manifest = json.loads((next((tmp_path / "engines_cache" / "hf").glob("*/manifest.json"))).read_text())
    assert manifest["key_inputs"]["model"]["path"] == str(tiny_checkpoint)
    assert len(manifest["key_inputs"]["model"]["weights_sha256"]) == 64
