"""backend=hf_paged: transformers' continuous batching on the tiny model, on the CPU (its paged cache, scheduler and
chunked prefill run here as on a GPU; CUDA graphs do not). Same greedy tokens as hf, requests joining mid-decode,
refusals before anything is built, and the CLI end to end."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cpu_config, make_requests, mlflow_runs, run_sweep

from sweep.backends.hf.backend import HFBackend
from sweep.backends.hf_paged import backend as hf_paged
from sweep.backends.hf_paged.backend import HFPagedBackend
from sweep.config.errors import ConfigError
from sweep.job.plan import make_plan, start_engine
from sweep.workload.requests import Request
from sweep.workload.stream import RequestStream


def compose(checkpoint: Path, cache_dir: Path, *overrides: str):
    return cpu_config(checkpoint, cache_dir, "backend=hf_paged", *overrides)


def start(backend_cls, cfg):
    p = make_plan(cfg)
    p.backend = backend_cls(cfg, p.model, p.device, p.dtype)  # hf beside hf_paged, on one config
    start_engine(p)
    return p.backend


def hf_tokens(cfg, requests: list[Request]) -> list[list[int]]:
    """The reference: eager transformers generate, one request at a time (no padding)."""
    hf = start(HFBackend, cfg)
    try:
        return [hf.generate([r])[0].token_ids for r in requests]
    finally:
        hf.close()


class ArrivesMidDecode(RequestStream):
    """The last request (offset inf) arrives the moment the first token of another one is reported: mid-decode by
    construction, however slow the host is."""

    def tokens(self, request_id: str, count: int = 1, at: float | None = None) -> None:
        super().tokens(request_id, count, at)
        with self._cond:
            if self._pending and math.isinf(self._pending[-1][0]):
                _, request, client = self._pending[-1]
                self._pending[-1] = (time.perf_counter(), request, client)
                self._cond.notify_all()


def test_greedy_tokens_equal_hf_with_chunked_prefill_and_arrivals_mid_decode(tiny_checkpoint, tmp_path):
    # A budget of 6 tokens per step splits the 17-token prompt over three steps; pages of 8 tokens make every request
    # span several pages. The third request arrives once the first two decode.
    cfg = compose(
        tiny_checkpoint,
        tmp_path,
        "engine.max_batch_size=3",
        "engine.max_num_tokens=6",
        "engine.tokens_per_block=8",
    )
    requests = make_requests([5, 17, 9], output_len=24)
    expected = hf_tokens(cfg, requests)
    paged = start(HFPagedBackend, cfg)
    step_tokens: list[int] = []  # tokens each forward pass embeds: prefill chunks and decodes together
    embeddings = paged.manager.model.get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, out: step_tokens.append(args[0].numel()))
    try:
        assert [g.token_ids for g in paged.generate(requests)] == expected
        assert max(step_tokens) == 6  # the budget bounds every step, and prefill fills it
        assert sum(step_tokens) == sum(r.input_len + r.output_len - 1 for r in requests)  # nothing computed twice
        stream = ArrivesMidDecode(requests, offsets=[0.0, 0.0, math.inf])
        stream.start()
        assert paged.serve_collecting(stream, max_batch=3) == {r.id: ids for r, ids in zip(requests, expected)}
    finally:
        paged.close()
    first, second, late = stream.results()
    assert all(len(t.token_times) == 24 for t in (first, second, late))
    assert late.arrival > first.token_times[0]  # it arrived mid-decode ...
    assert late.token_times[0] < min(first.token_times[-1], second.token_times[-1])  # ... and joined the batch
    assert all(t.arrival <= t.admitted <= t.token_times[0] for t in (first, second, late))


def test_kv_cache_and_step_settings_reach_transformers(tiny_checkpoint, tmp_path):
    cfg = compose(
        tiny_checkpoint,
        tmp_path,
        "engine.max_batch_size=2",
        "engine.max_num_tokens=24",
        "engine.tokens_per_block=16",
        "backend.kv_blocks=9",
    )
    paged = start(HFPagedBackend, cfg)
    try:
        resolved = paged.manager.continuous_batching_config
        assert (
            getattr(resolved, hf_paged.page_field(hf_paged.config_fields())),
            resolved.max_batch_tokens,
            resolved.max_requests_per_batch,
        ) == (16, 24, 2)
        assert resolved.num_blocks >= 9 and not resolved.allow_block_sharing  # whole sectors: at least the blocks
    finally:
        paged.close()
    # Without kv_blocks, the CPU cache holds max_batch_size requests of max_seq_len (not 60% of the host's RAM).
    assert (
        HFPagedBackend(
            compose(tiny_checkpoint, tmp_path, "engine.max_batch_size=3"), None, "cpu", "float32"
        ).kv_blocks()
        == 3 * 2
    )


def test_new_token_times_take_the_managers_stamps_and_survive_a_requeue():
    out = SimpleNamespace(generated_tokens=[7, 8, 9], timestamps=[1.0, 2.0, 3.0])
    assert hf_paged.new_token_times(out, seen=1) == [2.0, 3.0]
    assert hf_paged.new_token_times(out, seen=3) == []
    # A request the manager preempted and re-queued keeps its tokens but starts its stamps anew: now stands in.
    requeued = SimpleNamespace(generated_tokens=[7, 8, 9, 10], timestamps=[])
    before = time.perf_counter()
    times = hf_paged.new_token_times(requeued, seen=2)
    assert len(times) == 2 and all(t >= before for t in times)


REFUSALS = [
    (["engine.paged_kv_cache=false"], "engine.paged_kv_cache=False is not allowed for backend=hf_paged"),
    (["engine.tokens_per_block=2"], "engine.tokens_per_block=2 is not allowed for backend=hf_paged"),
    (
        ["engine.max_batch_size=4", "engine.max_num_tokens=3"],
        "engine.max_num_tokens=3 is below engine.max_batch_size=4",
    ),
    (
        ["backend.kv_blocks=1", "engine.tokens_per_block=32"],
        "backend.kv_blocks=1 pages of engine.tokens_per_block=32 tokens cannot hold one request of "
        "engine.max_seq_len=64 tokens; set backend.kv_blocks >= 2",
    ),
    (["backend.kv_memory_fraction=1.5"], "backend.kv_memory_fraction=1.5 is not allowed; it must be in (0, 1]"),
    (
        ["engine.attn_implementation=flex_attention"],
        "engine.attn_implementation='flex_attention' is not allowed for backend=hf_paged: transformers' continuous "
        "batching has no FlexAttention; choose one of: eager, sdpa, flash_attention_2",
    ),
]


@pytest.mark.parametrize("overrides, message", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_unusable_settings_are_refused_when_planning(tiny_checkpoint, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        make_plan(compose(tiny_checkpoint, tmp_path, *overrides))
    assert not (tmp_path / "hf_paged").exists()  # nothing built


def test_a_transformers_too_old_is_refused_with_the_minimum(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_paged.importlib.metadata, "version", lambda name: "5.16.2")
    with pytest.raises(ConfigError, match=r"needs transformers >= 5.17 .* but transformers 5.16.2 is installed"):
        make_plan(compose(tiny_checkpoint, tmp_path))


def test_a_transformers_without_an_api_it_passes_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    # Stands in for a release that renamed an argument: the check reads the installed signatures, not a version list.
    monkeypatch.setattr(hf_paged, "SUBMIT_ARGS", (*hf_paged.SUBMIT_ARGS, "renamed_argument"))
    with pytest.raises(ConfigError, match=r"its continuous batching lacks add_request\(renamed_argument=...\)"):
        make_plan(compose(tiny_checkpoint, tmp_path))


def test_cli_refusal_exits_non_zero_and_records_nothing(tmp_path):
    result = run_sweep(tmp_path, "backend=hf_paged", "engine.paged_kv_cache=false")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "engine.paged_kv_cache=False is not allowed for backend=hf_paged" in output
    assert "Traceback" not in output and mlflow_runs(tmp_path) == []


def test_cli_latency_and_rate_runs_end_to_end(tmp_path):
    latency = run_sweep(tmp_path, "backend=hf_paged", "workload.iterations=1")
    assert latency.returncode == 0, latency.stderr
    rate = run_sweep(
        tmp_path,
        "backend=hf_paged",
        "workload=rate",
        "workload.request_rate=40",
        "workload.num_requests=6",
        "workload.iterations=1",
        "engine.max_batch_size=3",
        "engine.max_num_tokens=16",  # prompts of 32 tokens: chunked prefill
    )
    assert rate.returncode == 0, rate.stderr
    runs = {r.data.tags["scenario"]: r for r in mlflow_runs(tmp_path)}
    assert set(runs) == {"latency", "rate"}
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["backend"] == "hf_paged"
        assert run.data.params["backend.kv_blocks"] == "None"
    assert runs["latency"].data.metrics["ttft_ms_n"] == 4
    rate_metrics = runs["rate"].data.metrics
    assert rate_metrics["queue_ms_n"] == 6 and rate_metrics["output_tokens"] == 6 * 32
    assert "offered_rate_req_s" in rate_metrics
