"""Benchmark: warm up, then run the workload `iterations` times under the NVML sampler, and compute the figures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from sweep.backends.base import Backend
from sweep.metrics import RequestTiming, benchmark_figures
from sweep.telemetry import GPUSampler, host_peak_rss_gb, torch_memory_figures
from sweep.workload import Request, Workload

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    figures: dict[str, float]
    timings: list[RequestTiming]


def run_once(backend: Backend, requests: list[Request], scenario: str, batch_size: int, iteration: int):
    if scenario == "throughput":
        return backend.serve(requests, batch_size, iteration)
    timings = []  # latency: one request at a time, each arriving when the previous one is done
    for req in requests:
        arrival = time.perf_counter()
        (gen,) = backend.generate([req])
        timings.append(RequestTiming(req.id, req.input_len, req.output_len, arrival, gen.token_times, iteration))
    return timings


def run_benchmark(backend: Backend, workload: Workload, wcfg: Any, batch_size: int) -> BenchmarkResult:
    if workload.warmup:
        with tqdm(total=1, desc="warm-up", unit="pass", leave=False) as bar:
            run_once(backend, workload.warmup, wcfg.scenario, batch_size, iteration=-1)
            bar.update()
    if backend.device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings: list[RequestTiming] = []
    with GPUSampler() as sampler:
        for iteration in tqdm(range(wcfg.iterations), desc=f"{wcfg.scenario} iterations", unit="it"):
            timings += run_once(backend, workload.measured, wcfg.scenario, batch_size, iteration)
    figures = benchmark_figures(timings)
    figures.update(sampler.figures(int(figures["output_tokens"])))
    figures.update(torch_memory_figures(backend.device))
    figures["host_peak_rss_gb"] = host_peak_rss_gb()
    return BenchmarkResult(figures, timings)
