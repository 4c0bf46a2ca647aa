"""backend=compiled: same greedy tokens as hf, padded batches, engine cache hits, and the CLI end to end.

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

from sweep.backends.compiled.backend import CompiledBackend
from sweep.backends.hf.backend import HFBackend
from sweep.compose import compose as compose_config
from sweep.errors import ConfigError
from sweep.model import generate_tiny_checkpoint
from sweep.plan import make_plan, start_engine
from sweep.workload import Request, Workload

REPO = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return generate_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"), seed=0)


def compose(checkpoint: Path, cache_dir: Path, *overrides: str):
    base = [
        f"model.path={checkpoint}",
        f"cache_dir={cache_dir}",
        "tracker=none",
        "device=cpu",
        "engine.dtype=float32",
        "engine.max_seq_len=64",
        "workload.input_len=8",
        "workload.output_len=8",
    ]
    return compose_config(base + list(overrides))


def make_requests(lengths: list[int], output_len: int = 12, seed: int = 1) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Request(f"r{i}", torch.randint(3, 250, (n,), generator=gen).tolist(), output_len) for i, n in enumerate(lengths)
    ]


def start(backend_cls, cfg, cache_dir: Path):
    """Plan and start an engine the way sweep.run does, with `backend_cls` serving; return it with its cache entry."""
    p = make_plan(cfg)
    p.backend = backend_cls(cfg, p.model, p.device, p.dtype)  # hf beside compiled, on one config
    assert p.cache.root == cache_dir.resolve()
    return p.backend, start_engine(p).entry


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_equal_hf_on_a_padded_batch(tiny_checkpoint, tmp_path, attn):
    # Three prompts of different lengths in an engine of four rows: left padding, and a dummy row.
    cfg = compose(
        tiny_checkpoint,
        tmp_path,
        "backend=compiled",
        "engine.compile_mode=none",
        "engine.max_batch_size=4",
        f"engine.attn_implementation={attn}",
    )
    requests = make_requests([7, 3, 5])
    hf, _ = start(HFBackend, cfg, tmp_path)
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
    assert entry.manifest["captured_batch_sizes"] == [4]
    assert "padded to max_batch_size" in entry.manifest["batch_padding"]


def test_each_request_gets_its_own_output_length_and_times(tiny_checkpoint, tmp_path):
    cfg = compose(tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2")
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
    cfg = compose(tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=none", "engine.max_batch_size=2")
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
    cfg = compose(tiny_checkpoint, tmp_path, "backend=compiled", "engine.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="engine.attn_implementation"):
        make_plan(cfg)
    # Left padding: a batch runs to its longest input plus its longest output, past what either request needs.
    p = make_plan(compose(tiny_checkpoint, tmp_path, "backend=compiled", "engine.max_seq_len=16"))
    workload = Workload(warmup=[], measured=[Request("a", [5] * 10, 2), Request("b", [5] * 2, 10)])
    with pytest.raises(ConfigError, match="engine.max_seq_len=16"):
        p.backend.check(workload)
    assert not (tmp_path / "compiled").exists()


def test_cli_end_to_end_records_a_miss_then_a_hit(tiny_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "-m",
        "backend=compiled",
        "engine.compile_mode=none",
        f"model.path={tiny_checkpoint}",
        f"cache_dir={tmp_path / 'engines'}",
        f"tracker.uri={uri}",
        "workload.num_requests=2",
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


@pytest.mark.skipif(os.environ.get("SWEEP_SLOW_TESTS") != "1", reason="Inductor's C++ build: about a minute on 2 cores")
def test_cpu_default_compile_matches_hf_and_saves_its_compile_cache(tiny_checkpoint, tmp_path):
    cfg = compose(
        tiny_checkpoint, tmp_path, "backend=compiled", "engine.compile_mode=default", "engine.max_batch_size=2"
    )
    requests = make_requests([6, 4])
    hf, _ = start(HFBackend, cfg, tmp_path)
    compiled, entry = start(CompiledBackend, cfg, tmp_path)
    try:
        assert [g.token_ids for g in compiled.generate(requests)] == [g.token_ids for g in hf.generate(requests)]
    finally:
        hf.close()
        compiled.close()
    assert (entry.path / "compile_cache.bin").is_file() and entry.manifest["compile_cache_entries"]["inductor"] >= 2


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "mode,graphs", [("reduce-overhead", True), ("default", True), ("none", True), ("default", False)]
)
def test_gpu_compiled_modes_match_hf_in_fp32(tiny_checkpoint, tmp_path, mode, graphs):
    cfg = compose(
        tiny_checkpoint,
        tmp_path,
        "backend=compiled",
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
