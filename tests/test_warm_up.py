"""The warm-up runs every shape class the timed part will use, so that a process's first run measures as warm as a
later one: real runs of the compiled engine on the tiny model (CPU). The shapes are observed by wrapping the
engine's own functions (they still run); nothing is faked."""

import json
import statistics
import subprocess
import sys

import pytest
import torch._dynamo.utils
from conftest import cpu_config, sweep_env

import sweep.backends.compiled.backend as compiled_backend
import sweep.backends.compiled.inflight as inflight
import sweep.measure.benchmark as benchmark
from sweep.job.execute import run

# Varied prompt lengths and a token budget that splits prompts: batches of several widths, prompt chunks of several
# shapes, decode at several sizes. All requests arrive at t0, so every iteration forms the same batches and chunks.
VARIED = [
    "workload=throughput",
    "workload.num_requests=6",
    "workload.warmup_requests=1",
    "workload.iterations=2",
    "workload.length_distribution=normal",
    "workload.input_len=12",
    "workload.input_len_std=5",
    "workload.output_len=5",
    "engine.max_batch_size=4",
    "engine.max_num_tokens=20",
    "engine.compile_mode=default",
]


def observe_shapes(monkeypatch) -> dict[str, set]:
    """The prefill widths, prompt chunks and decode (size, span) pairs the engine runs at load, in the harness's
    warm-up and while timing; and how many graphs dynamo had compiled when the timing began."""
    seen: dict[str, set] = {"load": set(), "warm": set(), "timed": set(), "graphs at timing": set()}
    phase = ["load"]
    real_warm_up = benchmark.warm_up

    def warm_up(*args):
        phase[0] = "warm"
        real_warm_up(*args)
        phase[0] = "timed"
        seen["graphs at timing"].add(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    monkeypatch.setattr(benchmark, "warm_up", warm_up)

    def record(owner, name, shapes):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            seen[phase[0]].update(shapes(args, result))
            return result

        monkeypatch.setattr(owner, name, wrapped)

    record(compiled_backend, "left_pad_batch", lambda a, r: [("prefill", r[0].shape[1])])
    record(compiled_backend, "warm_up_widths", lambda a, r: [("prefill", width) for width in a[2]])
    record(inflight, "prefill_chunk", lambda a, r: [("chunk", a[2].shape[0], a[3])])

    def decode_pair(args, result):
        step = args[0].steps[-1]
        return [("decode", step.graph_rows, step.span)] if step.graph_rows else []

    record(inflight.InflightScheduler, "_step", decode_pair)
    return seen


@pytest.mark.parametrize("scheduler", ["static", "inflight"])
def test_every_shape_the_timed_part_runs_was_run_before_timing(tiny_checkpoint, tmp_path, monkeypatch, scheduler):
    seen = observe_shapes(monkeypatch)
    result = run(cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", f"backend.scheduler={scheduler}", *VARIED))
    assert result.figures["graphs_compiled_while_timed"] == 0
    timed, before = seen["timed"], seen["load"] | seen["warm"]
    assert {shape[0] for shape in timed} == ({"prefill"} if scheduler == "static" else {"chunk", "decode"})
    assert len({s for s in timed if s[0] != "decode"}) > 1  # several widths or chunks: there is something to miss
    assert timed - before == set()
    (graphs_at_timing,) = seen["graphs at timing"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_at_timing  # nothing compiled while timed


def test_a_compile_while_timed_is_counted_and_warned_about(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    # dynamo forgets what the warm-up compiled, so the first timed iteration compiles the layers again
    real_warm_up = benchmark.warm_up

    def forgetful_warm_up(*args):
        real_warm_up(*args)
        torch._dynamo.reset()

    monkeypatch.setattr(benchmark, "warm_up", forgetful_warm_up)
    result = run(cpu_config(tiny_checkpoint, tmp_path, "backend=compiled", *VARIED))
    assert result.figures["graphs_compiled_while_timed"] >= 3  # the decode layer's and the prompt chunks' at least
    (warning,) = [r.getMessage() for r in caplog.records if "compiled while timed" in r.getMessage()]
    assert warning.startswith(f"{result.figures['graphs_compiled_while_timed']:.0f} graphs compiled while timed")


# A fresh process's first run, with every request's clock by iteration: the first timed iteration is where a first
# pass over a shape (a compile, a kernel's plan) would land.
FIRST_RUN = """
import json, statistics, sys
from sweep import compose, run
result = run(compose(sys.argv[1:]))
iterations = sorted({t.iteration for t in result.timings})
print(json.dumps([
    [statistics.median(getattr(t, clock) for t in result.timings if t.iteration == i) for clock in ("ttft", "e2e")]
    for i in iterations
]))
"""


def test_the_first_timed_iteration_of_a_process_agrees_with_the_later_ones(tiny_checkpoint, tmp_path):
    """A process's first run, measured first and later: its first iteration's median TTFT and E2E latency agree with
    the later iterations'. Timings on a shared CPU are noisy, so the tolerance is generous (3x); a cold first pass
    over the prompt chunks' shapes cost the first iteration ~50x on an idle CPU before the warm-up ran them."""
    overrides = [
        f"model.path={tiny_checkpoint}",
        f"cache_dir={tmp_path}",
        "tracker=none",
        "device=cpu",
        "backend=compiled",
        "engine.max_seq_len=64",
        *VARIED,
        "workload.iterations=4",
    ]
    result = subprocess.run(
        [sys.executable, "-c", FIRST_RUN, *overrides],
        cwd=tmp_path,
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, *later = json.loads(result.stdout.strip().splitlines()[-1])
    for clock, value in zip(("ttft", "e2e"), first):
        typical = statistics.median(iteration[clock == "e2e"] for iteration in later)
        assert typical / 3 < value < typical * 3, (clock, first, later)
