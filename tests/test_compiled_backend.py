"""backend=compiled: same greedy tokens as hf, padded batches and batching in flight, engine cache hits, the CLI.

CPU tests use compile_mode=none (Inductor's C++ build takes minutes on a CI runner); the static cache, masks,
step buffers and the decode loop are the same code under every compile mode. GPU tests compile for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_config, make_requests
from torch._dynamo.utils import counters

from sweep.backends.compiled.backend import CompiledBackend
from sweep.backends.hf.backend import HFBackend
from sweep.config.errors import ConfigError
from sweep.job.plan import make_plan, start_engine
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream

REPO = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def start(backend_cls, cfg, cache_dir: Path):
    """Plan and start an engine the way sweep.run does, with `backend_cls` serving; return it with its cache entry."""
    p = make_plan(cfg)
    p.backend = backend_cls(cfg, p.model, p.device, p.dtype)  # hf beside compiled, on one config
    assert p.cache.root == cache_dir.resolve()
    return p.backend, start_engine(p).entry


@pytest.mark.parametrize("scheduler", ["static", "inflight"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_greedy_tokens_equal_hf_on_a_batch(tiny_checkpoint, tmp_path, attn, scheduler):
    # Three prompts of different lengths in an engine of four rows: static pads them (left padding, a dummy row),
    # in flight gives each its own row. hf runs FlexAttention only on a GPU: against flex, hf runs SDPA.
    def config(attn_implementation):
        return cpu_config(
            tiny_checkpoint,
            tmp_path,
            "backend=compiled",
            f"backend.scheduler={scheduler}",
            "engine.compile_mode=none",
            "engine.max_batch_size=4",
            f"engine.attn_implementation={attn_implementation}",
        )

    cfg = config(attn)
    requests = make_requests([7, 3, 5])
    hf, _ = start(HFBackend, config("sdpa" if attn == "flex_attention" else attn), tmp_path)
    compiled, entry = start(CompiledBackend, cfg, tmp_path)
    try:
        layer = compiled.state.model.model.layers[0]
        assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")  # the fused projections ran
        assert [g.token_ids for g in compiled.generate(requests)] == [g.token_ids for g in hf.generate(requests)]
        for req in requests:  # one request at a time through the same four-row engine
            assert compiled.generate([req])[0].token_ids == hf.generate([req])[0].token_ids
    finally:
        hf.close()
        compiled.close()
    if scheduler == "static":
        assert entry.manifest["captured_batch_sizes"] == [4]
        assert "padded to max_batch_size" in entry.manifest["batch_padding"]
    else:
        assert entry.manifest["captured_batch_sizes"] == [1, 2, 4]  # the default: powers of two up to 4
        assert entry.manifest["key_inputs"]["settings"] == {"scheduler": "inflight"}


def test_each_request_gets_its_own_output_length_and_times(tiny_checkpoint, tmp_path):
    cfg = cpu_config(
        tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2"
    )
    compiled, _ = start(CompiledBackend, cfg, tmp_path)
    try:
        short, long = make_requests([4, 6], output_len=9)
        short = Request(short.id, short.input_ids, 3)
        gens = compiled.generate([short, long])
    finally:
        compiled.close()
    assert [len(g.token_ids) for g in gens] == [3, 9]
    assert [len(g.token_times) for g in gens] == [3, 9]
    assert gens[1].token_times == sorted(gens[1].token_times)


def test_second_build_is_a_cache_hit_with_the_same_tokens(tiny_checkpoint, tmp_path):
    cfg = cpu_config(
        tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2"
    )
    requests = make_requests([5, 6])
    first, miss = start(CompiledBackend, cfg, tmp_path)
    try:
        expected = [g.token_ids for g in first.generate(requests)]
    finally:
        first.close()
    second, hit = start(CompiledBackend, cfg, tmp_path)
    try:
        assert [g.token_ids for g in second.generate(requests)] == expected
    finally:
        second.close()
    assert (miss.hit, hit.hit) == (False, True)
    assert hit.path == miss.path and (hit.path / "build.log").is_file()
    assert hit.manifest["decode"].startswith("eager")


def test_unsupported_options_fail_before_building(tiny_checkpoint, tmp_path):
    cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "engine.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="engine.attn_implementation"):
        make_plan(cfg)
    # Left padding: a static batch runs to its longest input plus its longest output, past what either request needs;
    # in flight each request has a row of its own, so only each one's input + output must fit.
    workload = Workload(warmup=[], measured=[Request("a", [5] * 10, 2), Request("b", [5] * 2, 10)])
    static = make_plan(
        cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "backend.scheduler=static", "engine.max_seq_len=16")
    )
    with pytest.raises(ConfigError, match="engine.max_seq_len=16"):
        static.backend.check(workload)
    inflight = make_plan(cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "engine.max_seq_len=16")).backend
    inflight.check(workload)
    with pytest.raises(ConfigError, match=r"engine.max_seq_len=16 cannot hold the workload's longest input \+ output"):
        inflight.check(Workload(warmup=[], measured=[Request("c", [5] * 10, 7)]))
    assert not (tmp_path / "compiled").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["engine.max_batch_size=4", "engine.max_num_tokens=3"],
            r"engine.max_num_tokens=3 cannot hold one step of backend.scheduler=inflight: every running request "
            r"decodes one token per step; set engine.max_num_tokens >= engine.max_batch_size=4",
        ),
        (["backend.scheduler=waves"], "backend.scheduler='waves' is not allowed; choose one of: inflight, static"),
        (
            ["engine.max_batch_size=4", "engine.cuda_graph_batch_sizes=[1,8]"],
            r"engine.cuda_graph_batch_sizes=\[1, 8\] is not allowed; every size must be between 1 and "
            r"engine.max_batch_size=4",
        ),
        (["engine.max_num_tokens=0"], "engine.max_num_tokens=0 is not allowed; it must be >= 1"),
        (
            ["engine.attn_implementation=flex_attention", "engine.compile_mode=default"],
            r"engine.attn_implementation='flex_attention' with engine.compile_mode='default' needs a GPU for "
            r"backend=compiled: Inductor builds FlexAttention's kernel there, not on a CPU",
        ),
    ],
)
def test_inflight_engines_that_cannot_run_are_refused_before_building(tiny_checkpoint, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", *overrides))
    assert not (tmp_path / "compiled").exists()


@pytest.mark.parametrize("piecewise", [True, False])
def test_decoder_layers_run_piecewise_only_where_their_forward_is_the_known_pre_norm_one(
    tiny_checkpoint, tmp_path, monkeypatch, piecewise
):
    # The tiny model's Qwen2 layers run norm, attention and MLP one by one, each layer's last residual add left to
    # the next; a layer class not listed runs its own forward. Both give hf's tokens.
    from sweep.backends.compiled import engine

    if not piecewise:
        monkeypatch.setattr(engine, "PRE_NORM_LAYERS", frozenset())
    cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none")
    requests = make_requests([7, 3, 5])
    hf, _ = start(HFBackend, cfg, tmp_path)
    expected = [g.token_ids for g in hf.generate(requests)]
    hf.close()
    compiled = inflight_engine(tiny_checkpoint, tmp_path, "engine.max_batch_size=4")
    layer_class = type(compiled.state.model.model.layers[0])
    calls = []
    own_forward = layer_class.forward
    monkeypatch.setattr(layer_class, "forward", lambda self, *a, **k: calls.append(1) or own_forward(self, *a, **k))
    try:
        assert [g.token_ids for g in compiled.generate(requests)] == expected
    finally:
        compiled.close()
    assert layer_class.__name__ == "Qwen2DecoderLayer"
    assert (len(calls) == 0) == piecewise


def tiny_of_architecture(model_type: str, tokenizer_from: Path, where: Path) -> Path:
    """A two-layer checkpoint of transformers' `model_type` with seeded random weights and the tiny tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, pad_token_id=0,
    )  # fmt: skip
    extra = {"granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22), "mistral": dict(sliding_window=None)}
    config = AutoConfig.for_model(model_type, **sizes, **extra.get(model_type, {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, where / f.name)
    return where


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gemma", "phi3"])
def test_each_listed_architecture_gives_hfs_tokens(tiny_checkpoint, tmp_path, model_type):
    from sweep.backends.compiled.backend import ARCHITECTURES

    checkpoint = tiny_of_architecture(model_type, tiny_checkpoint, tmp_path / model_type)
    cfg = cpu_config(checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2")
    requests = make_requests([7, 3], output_len=8)
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled, _ = start(CompiledBackend, cfg, tmp_path)
    try:
        assert compiled.model.shape.architecture in ARCHITECTURES
        assert [g.token_ids for g in compiled.generate(requests)] == [g.token_ids for g in hf.generate(requests)]
    finally:
        hf.close()
        compiled.close()


def test_an_architecture_whose_forward_does_more_is_refused_before_building(tiny_checkpoint, tmp_path, monkeypatch):
    # Granite multiplies the embeddings in its model's forward, which the engine does not run: refused, and let
    # through it gives other tokens than transformers.
    from sweep.backends.compiled import backend

    checkpoint = tiny_of_architecture("granite", tiny_checkpoint, tmp_path / "granite")
    cfg = cpu_config(checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2")
    with pytest.raises(ConfigError, match=r"is a GraniteForCausalLM, which backend=compiled does not run .*Llama"):
        make_plan(cfg)
    assert not (tmp_path / "compiled").exists()

    monkeypatch.setattr(backend, "ARCHITECTURES", (*backend.ARCHITECTURES, "GraniteForCausalLM"))
    requests = make_requests([7, 3], output_len=8)
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled, _ = start(CompiledBackend, cfg, tmp_path)
    try:
        assert [g.token_ids for g in compiled.generate(requests)] != [g.token_ids for g in hf.generate(requests)]
    finally:
        hf.close()
        compiled.close()


def inflight_engine(checkpoint: Path, cache_dir: Path, *overrides: str):
    cfg = cpu_config(checkpoint, cache_dir, "backend=compiled", "engine.compile_mode=none", *overrides)
    return start(CompiledBackend, cfg, cache_dir)[0]


def mixed_requests() -> list[Request]:
    """Six requests of mixed prompt and output lengths: served by a few closed-loop clients, later ones arrive while
    earlier ones prefill or decode."""
    return [Request(r.id, r.input_ids, out) for r, out in zip(make_requests([7, 3, 9, 2, 6, 5]), [9, 3, 6, 1, 8, 4])]


def test_inflight_tokens_equal_hf_with_arrivals_mid_decode(tiny_checkpoint, tmp_path, monkeypatch):
    # Two clients in a closed loop: each finish sends that client's next request while the other one is decoding
    # (or prefilling), so requests join a running batch; a 4-token budget splits the longer prompts over steps.
    # A prompt's first chunk attends causally with no mask (FlashAttention's case), a later chunk through one.
    from sweep.backends.compiled import patches

    chunks = []  # (starts at column 0, has a mask) of each prompt chunk's attention

    def recording_sdpa(module, query, key, value, mask, **kwargs):
        chunks.append((key.shape[2] == query.shape[2], mask is not None))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    sdpa_attention_forward = patches.sdpa_attention_forward
    monkeypatch.setattr(patches, "sdpa_attention_forward", recording_sdpa)
    cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none")
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled = inflight_engine(tiny_checkpoint, tmp_path, "engine.max_batch_size=3", "engine.max_num_tokens=4")
    chunks.clear()  # warm-up's
    requests = mixed_requests()
    try:
        expected = {r.id: hf.generate([r])[0].token_ids for r in requests}
        stream = RequestStream(requests, clients=2)
        stream.start()
        tokens = compiled.serve_tokens(stream, 3)
    finally:
        hf.close()
        compiled.close()
    assert tokens == expected
    assert {(True, False), (False, True)} <= set(chunks) and (True, True) not in chunks
    records = {t.request_id: t for t in stream.results()}
    joined = [t for t in records.values() if t.arrival > stream.t0]  # sent by a finish, not at the start
    assert any(t.arrival < max(u.token_times[-1] for u in records.values() if u is not t) for t in joined)


def test_a_request_that_arrives_mid_decode_gets_its_first_token_before_the_running_one_finishes(
    tiny_checkpoint, tmp_path
):
    # Client 0 sends a long request; client 1 a short one and, when it finishes, a third one: that one arrives
    # while the long one decodes. In flight it joins at once; static batching makes it wait for the long one.
    long, short, late = make_requests([6, 4, 5])
    requests = [Request(long.id, long.input_ids, 40), Request(short.id, short.input_ids, 3), late]
    first_token_before_long_finished = {}
    for scheduler in ("inflight", "static"):
        engine = inflight_engine(
            tiny_checkpoint,
            tmp_path,
            f"backend.scheduler={scheduler}",
            "engine.max_batch_size=2",
            "engine.max_seq_len=48",
        )
        try:
            stream = RequestStream(requests, clients=2)
            stream.start()
            engine.serve(stream, 2)
        finally:
            engine.close()
        records = {t.request_id: t for t in stream.results()}
        if scheduler == "inflight":  # static reports the short one's finish with its whole batch's
            assert records[late.id].arrival < records[long.id].token_times[-1]  # it arrived mid-decode
        first_token_before_long_finished[scheduler] = records[late.id].token_times[0] < records[long.id].token_times[-1]
    assert first_token_before_long_finished == {"inflight": True, "static": False}


def test_max_num_tokens_bounds_the_tokens_each_step_processes(tiny_checkpoint, tmp_path):
    # The engine records each step's decoded and prefilled tokens (InflightScheduler.steps); a hook on the
    # embedding counts what the model was really given, so the record is checked against the model's own count.
    budget = 5
    compiled = inflight_engine(tiny_checkpoint, tmp_path, "engine.max_batch_size=3", f"engine.max_num_tokens={budget}")
    embedded: list[int] = []
    hook = compiled.state.model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: embedded.append(args[0].numel())
    )
    requests = make_requests([3, 17, 12, 4], output_len=6)
    try:
        stream = RequestStream(requests, offsets=[0.0] * len(requests))
        stream.start()
        compiled.serve_tokens(stream, 3)
        steps = compiled.scheduler.steps
    finally:
        hook.remove()
        compiled.close()
    assert all(s.decoded + s.prefilled <= budget for s in steps)
    assert sum(s.prefilled for s in steps) == sum(r.input_len for r in requests)  # every prompt once
    assert sum(embedded) == sum(s.prefilled + s.graph_rows for s in steps)  # decode runs its graph's rows
    # The 17-token prompt takes several steps, while the running requests keep decoding in them.
    assert sum(1 for s in steps if s.decoded and s.prefilled) >= 3


def test_decode_attends_over_the_smallest_span_that_covers_the_longest_running_sequence(
    tiny_checkpoint, tmp_path, monkeypatch
):
    # Each decode step reads the first `span` columns of the cache; the key length layer 0's attention receives
    # is recorded beside the longest decoding row's length at that step, read from the state itself.
    from sweep.backends.compiled import inflight

    seen: list[tuple[int, int]] = []  # (key length given to attention, longest decoding sequence incl. new token)
    update = inflight.RowCache.update
    engine = {}  # the engine under test, once started

    def recording_update(self, key_states, value_states, *args, **kwargs):
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        state = engine.get("state")
        live = state.live[: self.pos.shape[0]].bool() if state is not None else None
        if state is not None and self.keys is state.keys[0] and live.any():  # layer 0, a step that decodes
            seen.append((keys.shape[2], int(self.pos[live].max()) + 1))
        return keys, values

    monkeypatch.setattr(inflight.RowCache, "update", recording_update)
    compiled = inflight_engine(tiny_checkpoint, tmp_path, "engine.max_batch_size=3")  # max_seq_len 64
    engine["state"] = compiled.state
    hf, _ = start(HFBackend, cpu_config(tiny_checkpoint, tmp_path, "backend=hf"), tmp_path)
    requests = make_requests([5, 20, 11], output_len=30)
    steps = []
    try:
        assert compiled.spans == [8, 16, 24, 32, 40, 48, 56, 64]
        # The 5-token prompt alone runs through the spans up to 40 (columns 6 to 35); the three together up to 56.
        for batch in ([requests[0]], requests):
            got = [g.token_ids for g in compiled.generate(batch)]
            assert got == [g.token_ids for g in hf.generate(batch)]
            steps += [s for s in compiled.scheduler.steps if s.graph_rows]
    finally:
        compiled.close()
        hf.close()
    assert [span for span, _ in seen] == [s.span for s in steps]
    assert all(span == min(s for s in compiled.spans if s >= longest) for span, longest in seen)
    assert {span for span, _ in seen} == {8, 16, 24, 32, 40, 48, 56}


def test_cli_end_to_end_records_a_miss_then_a_hit(tiny_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "-m",
        "backend=compiled",  # in flight, the default scheduler
        "engine.compile_mode=none",
        "engine.max_batch_size=2",
        "workload=rate",
        "workload.request_rate=50",
        f"model.path={tiny_checkpoint}",
        f"cache_dir={tmp_path / 'engines'}",
        f"tracker.uri={uri}",
        "workload.num_requests=3",
        "workload.iterations=1",
        "workload.input_len=8",
        "workload.output_len=8",
        "engine.max_seq_len=64",
        "device=cpu",
        "workload.seed=0,1",  # two jobs, one engine: a miss, then a hit
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id], order_by=["start_time ASC"])
    runs = [r for r in runs if "backend" in r.data.tags]  # the jobs, not a multirun's parent run
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.tags["engine.cache_hit"] for r in runs] == ["False", "True"]
    assert all(r.data.tags["backend"] == "compiled" for r in runs)
    assert all(r.data.metrics["output_throughput_tok_s"] > 0 for r in runs)
    assert runs[1].data.metrics["build_time_s"] == 0.0 and "compile_and_warmup_s" in runs[1].data.metrics
    assert "max_input_len" in runs[0].data.params["engine.ignored_options"]
    assert "tokens_per_block" in runs[0].data.params["engine.ignored_options"]  # slots, no pages
    assert runs[0].data.params["backend.scheduler"] == "inflight" and runs[0].data.metrics["queue_ms_n"] == 3


@pytest.mark.parametrize(
    "scheduler",
    [
        pytest.param(
            "static",
            marks=pytest.mark.skipif(
                os.environ.get("SWEEP_SLOW_TESTS") != "1", reason="Inductor's C++ build: about a minute on 2 cores"
            ),
        ),
        "inflight",  # one decoder layer compiles: ~20 s on 2 cores
    ],
)
def test_cpu_default_compile_matches_hf_and_saves_its_compile_cache(tiny_checkpoint, tmp_path, scheduler):
    cfg = cpu_config(
        tiny_checkpoint,
        tmp_path,
        "backend=compiled",
        f"backend.scheduler={scheduler}",
        "engine.compile_mode=default",
        "engine.max_batch_size=2",
    )
    requests = make_requests([6, 4])
    hf, _ = start(HFBackend, cfg, tmp_path)
    counters.clear()
    compiled, entry = start(CompiledBackend, cfg, tmp_path)
    layers, decode_calls = len(compiled.state.model.model.layers), len(compiled.sizes) * len(compiled.spans)
    try:
        assert [g.token_ids for g in compiled.generate(requests)] == [g.token_ids for g in hf.generate(requests)]
    finally:
        hf.close()
        compiled.close()
    assert (entry.path / "compile_cache.bin").is_file() and entry.manifest["compile_cache_entries"]["inductor"] >= 2
    if scheduler == "inflight":
        # Both layers and all 16 (size, span) decode calls ran from at most three compiles of one layer, and every
        # prompt chunk from four of another (from column 0 or on from a chunk, static then symbolic).
        assert layers == 2 and decode_calls == 16
        assert counters["stats"]["unique_graphs"] <= 3 + 4
        assert "one decoder layer" in entry.manifest["decode"]
        assert "one decoder layer per prompt chunk" in entry.manifest["prefill"]


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "mode,graphs", [("reduce-overhead", True), ("default", True), ("none", True), ("default", False)]
)
def test_gpu_compiled_modes_match_hf_in_fp32(tiny_checkpoint, tmp_path, mode, graphs):
    cfg = cpu_config(
        tiny_checkpoint,
        tmp_path,
        "backend=compiled",
        "backend.scheduler=static",
        "device=cuda",
        f"engine.compile_mode={mode}",
        f"engine.cuda_graphs={graphs}",
        "engine.max_batch_size=4",
    )
    requests = make_requests([7, 3, 5])
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled, entry = start(CompiledBackend, cfg, tmp_path)
    try:
        assert [g.token_ids for g in compiled.generate(requests)] == [g.token_ids for g in hf.generate(requests)]
        assert compiled.generate(requests[:1])[0].token_ids == hf.generate(requests[:1])[0].token_ids
    finally:
        hf.close()
        compiled.close()
    if mode != "none":
        assert (entry.path / "compile_cache.bin").is_file()


@gpu
@needs_cuda
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "none"])
def test_gpu_inflight_matches_hf_in_fp32_with_arrivals_mid_decode(tiny_checkpoint, tmp_path, mode, attn):
    cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", "device=cuda")
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled = inflight_engine(
        tiny_checkpoint,
        tmp_path,
        "device=cuda",
        f"engine.compile_mode={mode}",
        f"engine.attn_implementation={attn}",
        "engine.max_batch_size=4",
        "engine.max_num_tokens=6",
    )
    requests = mixed_requests()
    try:
        expected = {r.id: hf.generate([r])[0].token_ids for r in requests}
        stream = RequestStream(requests, clients=3)
        stream.start()
        tokens = compiled.serve_tokens(stream, 4)
        steps = compiled.scheduler.steps
    finally:
        hf.close()
        compiled.close()
    assert tokens == expected
    assert all(s.decoded + s.prefilled <= 6 for s in steps)


def test_prompt_attention_never_runs_cudnn_and_decode_attention_reads_the_cache_once(monkeypatch):
    """Prompt attention goes to SDPA with cuDNN's kernel off (it builds a graph per prompt length); decode attention of
    grouped heads is computed here, equal to SDPA over repeated KV heads."""
    from sweep.backends.compiled import patches

    seen = []

    def spy(module, query, key, value, mask, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return query.transpose(1, 2), None

    monkeypatch.setattr(patches, "sdpa_attention_forward", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool).tril(diagonal=2)
    patches.static_cache_sdpa(None, query, key, value, mask)
    assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()  # off inside the prompt's attention only

    step_query, step_mask = torch.randn(2, 4, 1, 8), torch.rand(2, 1, 1, 5) > 0.3
    step_mask[..., 0] = True
    out, _ = patches.static_cache_sdpa(
        None, step_query, key.expand(2, -1, -1, -1), value.expand(2, -1, -1, -1), step_mask
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        step_query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=step_mask
    )
    assert seen == [False]  # decode did not go through SDPA
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=[gpu, needs_cuda])]
)  # Inductor builds FlexAttention's kernel on a GPU only (compiled_refusals)
def test_flex_decode_attention_equals_sdpa_and_reads_only_each_rows_blocks(monkeypatch, compiled):
    """Decode attention through FlexAttention, eager on the CPU, and compiled on a GPU with symbolic rows and span (as
    the decode layer compiles): each row sees one run of columns (its first real one to its own, as left padding or a
    slot gives), equal to SDPA over repeated KV heads; its block mask lists the 128-column blocks that hold that run
    and no others."""
    from sweep.backends.compiled import patches

    device = "cuda" if compiled else "cpu"

    masks = []
    from_kv_blocks = patches.BlockMask.from_kv_blocks

    def recording(*args, **kwargs):
        masks.append(args[0].flatten().tolist())
        return from_kv_blocks(*args, **kwargs)

    if not compiled:
        monkeypatch.setattr(patches.BlockMask, "from_kv_blocks", recording)
    attend = torch.compile(patches.static_cache_flex, fullgraph=True, dynamic=None) if compiled else None
    torch.manual_seed(0)
    for runs, span in [([(0, 1)], 8), ([(0, 300), (5, 130), (0, 129), (200, 336)], 336), ([(3, 9), (0, 264)], 264)]:
        rows = len(runs)
        query, key, value = (torch.randn(rows, h, n, 16, device=device) for h, n in ((4, 1), (2, span), (2, span)))
        cols = torch.arange(span, device=device)
        mask = torch.stack([(cols >= a) & (cols < b) for a, b in runs])[:, None, None, :]
        out, _ = (attend or patches.static_cache_flex)(None, query, key, value, mask, scaling=0.25)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.25
        )
        torch.testing.assert_close(out, expected.transpose(1, 2))
        if not compiled:
            assert masks.pop() == [(b - 1) // 128 + 1 - a // 128 for a, b in runs]


def test_flex_decode_layer_compiles_at_most_three_times_for_every_size_and_span(tiny_checkpoint, tmp_path, monkeypatch):
    # Inductor builds FlexAttention's kernel on a GPU only, so here torch.compile runs with backend=aot_eager: dynamo
    # traces the decode layer exactly as on a GPU (guards, recompiles, the step's block mask as an input), and the
    # graphs run as they trace instead of as generated code. The in-flight scheduler then serves with those calls.
    from sweep.backends.compiled import inflight, patches
    from sweep.backends.hf.backend import load_hf_model

    compiles = []  # the decode layer's graphs

    def aot_eager(graph, example_inputs):
        compiles.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    compile_ = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **kwargs: (
            compile_(fn, fullgraph=True, backend=aot_eager) if fn is inflight.decode_layer else compile_(fn, **kwargs)
        ),
    )
    masks = []  # each decode step's mask, built outside the compiled layer
    decode_mask = inflight.decode_mask
    monkeypatch.setattr(inflight, "decode_mask", lambda *args: masks.append(decode_mask(*args)) or masks[-1])
    patches.register_attention()
    torch._dynamo.reset()
    model, _ = load_hf_model(tiny_checkpoint, "float32", patches.ATTENTION["flex_attention"], "cpu")
    patches.fuse_projections(model)
    requests = mixed_requests()
    with torch.inference_mode():
        state = inflight.SlotState(model, 4, 64, "flex_attention")
        calls = inflight.make_decode_calls(state, {"decode": {}}, [1, 2, 4], inflight.attention_spans(64))
        run_prefill = inflight.make_prefill_call(state, {"prefill": None})
        inflight.warm_up_inflight(state, calls, run_prefill)
        assert len(calls) == 24 and 0 < len(compiles) <= 3
        stream = RequestStream(requests, clients=3)
        stream.start()
        tokens = inflight.InflightScheduler(state, calls, run_prefill, max_num_tokens=6).serve(stream, 4)
    assert len(compiles) <= 3  # serving compiled nothing more
    assert masks and all(isinstance(m, patches.BlockMask) and m.mask_mod is state.row_sees for m in masks)
    hf, _ = start(HFBackend, cpu_config(tiny_checkpoint, tmp_path, "backend=hf"), tmp_path)
    try:
        assert tokens == {r.id: hf.generate([r])[0].token_ids for r in requests}
    finally:
        hf.close()
        torch._dynamo.reset()
