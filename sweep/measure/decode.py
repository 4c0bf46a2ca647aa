"""Decode steps on their own: timed back to back, profiled kernel by kernel, and their tokens compared.

A run times whole requests (TPOT includes the host's wait for every token); these time an engine's decode step as the
device runs it, queued back to back with no host sync per token, through a backend's DecodeLoop
(sweep/backends/base.py). The benchmarks reach them through sweep.open_engine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from sweep.backends.base import DecodeLoop

# Kernel kinds by name; the first match wins (cuDNN's SDPA kernels have sm90 in their names too).
KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "efficient")),
    ("gemm/gemv", ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet", "sm90", "splitk")),
    ("fused triton (norms, rope, mask, argmax, adds)", ("triton",)),
    ("copies/fills", ("copy", "fill", "memcpy", "memset", "index")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def time_decode(loop: DecodeLoop, steps: int, repeats: int, cuda: bool) -> float:
    """The median over `repeats` of the ms per step of `steps` decode steps queued back to back, each stretch from
    the same cache column (CUDA events on a GPU, the host clock on a CPU)."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            loop.reset()
            if cuda:
                torch.cuda.synchronize()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(steps):
                    loop.step()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / steps)
            else:
                start = time.perf_counter()
                for _ in range(steps):
                    loop.step()
                times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def profile_decode(loop: DecodeLoop, steps: int = 8) -> dict[str, Any]:
    """The GPU kernels of `steps` decode steps (those replayed from CUDA graphs included), per step: how many, the
    time some kernel ran (overlaps counted once), the time from the first kernel's start to the last one's end, and
    the idle between them (launch gaps inside a replayed graph, or host waits); each kind's share of kernel time,
    the top kernels, and torch.profiler's table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        loop.reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                loop.step()
            torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and e.time_range.end > e.time_range.start
        and e.name != "Activity Buffer Request"
    )
    if not kernels:
        return {}
    busy_us, cursor = 0.0, kernels[0][0]
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for start, end, name in kernels:
        busy_us += max(0.0, end - max(start, cursor))
        cursor = max(cursor, end)
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + (end - start)
        by_name.setdefault(name, []).append(end - start)
    window_us = kernels[-1][1] - kernels[0][0]
    total_us = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {
        "profiled_steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms_per_step": busy_us / 1e3 / steps,
        "span_ms_per_step": window_us / 1e3 / steps,
        "idle_ms_per_step": (window_us - busy_us) / 1e3 / steps,
        "kernel_busy_pct": 100 * busy_us / window_us,
        "share_pct": {k: 100 * v / total_us for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "kernel": name[:90],
                "calls_per_step": len(d) / steps,
                "us_per_step": sum(d) / steps,
                "share_pct": 100 * sum(d) / total_us,
            }
            for name, d in top
        ],
        "table": prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=90),
    }


def token_match(reference: list[list[int]], rows: list[list[int]]) -> dict[str, float]:
    """How far `rows` agree with `reference` (the same prompts, greedy): exact sequences, tokens before the first
    difference, and equal tokens position by position, in % of the reference's."""
    exact = sum(a == b for a, b in zip(reference, rows))
    prefix, equal, total = 0, 0, 0
    for a, b in zip(reference, rows):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return {
        "sequences": len(reference),
        "exact_sequence_pct": 100 * exact / len(reference),
        "prefix_match_pct": 100 * prefix / total,
        "position_match_pct": 100 * equal / total,
    }
