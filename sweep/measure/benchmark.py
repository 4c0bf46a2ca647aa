"""Benchmark: warm up (every shape the timed part will use, once: warm_up), then offer the workload `iterations`
times under the NVML sampler, and compute the figures.

The scenario decides when each request is offered (sweep/workload/stream.py); the backend serves them as they arrive.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from sweep.backends.base import Backend
from sweep.measure.metrics import benchmark_figures, load_figures
from sweep.measure.telemetry import GPUSampler, host_peak_rss_gb, torch_memory_figures
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream, open_loop_offsets
from sweep.workload.timing import RequestTiming

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    figures: dict[str, float]
    timings: list[RequestTiming]


def request_stream(requests: list[Request], wcfg: Any, iteration: int) -> RequestStream:
    """The scenario's arrival process: latency is one closed-loop client, throughput is every request at t0."""
    if wcfg.scenario == "latency":
        return RequestStream(requests, clients=1, iteration=iteration)
    if wcfg.scenario == "concurrency":
        return RequestStream(requests, clients=wcfg.concurrency, iteration=iteration)
    rate = wcfg.request_rate if wcfg.scenario == "rate" else math.inf
    # Each iteration draws its own arrivals from the seed, so iterations differ but the run is reproducible.
    offsets = open_loop_offsets(len(requests), rate, wcfg.burstiness, wcfg.seed + 1000 * (iteration + 1))
    return RequestStream(requests, offsets=offsets, iteration=iteration)


def engine_changes_workload(wcfg: Any, batch_size: int, limit_key: str) -> str | None:
    """One line when the engine cannot take the workload as asked, before anything is measured (None when it can).

    Closed loop: more clients than the engine serves at once queue behind it, so the run measures the engine's
    concurrency, not the one asked for. (An open loop that the engine does not keep up with shows after the run:
    the achieved rate falls below the offered one, and the run is tagged saturated.)
    """
    if wcfg.scenario == "concurrency" and wcfg.concurrency > batch_size:
        return (
            f"workload.concurrency={wcfg.concurrency} but the engine serves at most {batch_size} request(s) at once "
            f"({limit_key}={batch_size}): {wcfg.concurrency - batch_size} client(s) wait in its queue, so this "
            f"measures concurrency {batch_size}; raise {limit_key} to serve them all"
        )
    return None


def run_once(backend: Backend, requests: list[Request], wcfg: Any, batch_size: int, iteration: int):
    stream = request_stream(requests, wcfg, iteration)
    stream.start()
    backend.serve(stream, batch_size)
    return stream.results()


def warm_up(backend: Backend, workload: Workload, wcfg: Any, batch_size: int) -> None:
    """Run, untimed, every shape class the timed part will use, so that no timed request pays for a first pass over
    one (a compile or recompile, a CUDA graph capture, a kernel's plan for a new shape): a process's first run would
    otherwise measure colder than the same point run later.

    In order: the backend's own classes (Backend.warm_up: e.g. every prompt width a compiled prefill serves), the
    warm-up requests, then the measured requests offered exactly as the first timed iteration offers them, so that
    the batches, prompt chunks and decode sizes its scheduler forms from them have all run once.
    """
    with tqdm(total=3, desc="warm-up", unit="pass", leave=False) as bar:
        backend.warm_up(workload)
        bar.update()
        if workload.warmup:
            run_once(backend, workload.warmup, wcfg, batch_size, iteration=-1)
        bar.update()
        run_once(backend, workload.measured, wcfg, batch_size, iteration=0)
        bar.update()


def compiled_graphs() -> int:
    """The graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_benchmark(
    backend: Backend, workload: Workload, wcfg: Any, batch_size: int, slo: dict[str, float]
) -> BenchmarkResult:
    warm_up(backend, workload, wcfg, batch_size)
    if backend.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings: list[RequestTiming] = []
    compiled_before = compiled_graphs() if backend.compiles_in_process else None
    with GPUSampler() as sampler:
        for iteration in tqdm(range(wcfg.iterations), desc=f"{wcfg.scenario} iterations", unit="it"):
            timings += run_once(backend, workload.measured, wcfg, batch_size, iteration)
    figures = benchmark_figures(timings, slo)
    if compiled_before is not None:
        figures["graphs_compiled_while_timed"] = float(compiled_graphs() - compiled_before)
    if wcfg.scenario == "rate":
        figures.update(load_figures(timings))
    figures.update(sampler.figures(int(figures["output_tokens"])))
    figures.update(torch_memory_figures(backend.device))
    figures["host_peak_rss_gb"] = host_peak_rss_gb()
    return BenchmarkResult(figures, timings)
