"""Figure arithmetic, as docs/figures.md defines it (names, units and meanings: sweep/measure/figures.py).

Pure functions over timestamps (seconds, one clock), so they are tested on synthetic timings.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Mapping

import numpy as np

from sweep.measure.figures import FIGURES
from sweep.workload.timing import RequestTiming

PERCENTILES = (50, 90, 95, 99)
THROUGHPUT_FIGURES = tuple(f.name for f in FIGURES if f.spread)  # per iteration: median, min and max


def summarize(values: Iterable[float]) -> dict[str, float]:
    """P50/P90/P95/P99 (numpy, linear), mean, stdev (population), min, max and n. Empty input gives n=0 only."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"n": 0}
    stats = {f"p{p}": float(np.percentile(arr, p, method="linear")) for p in PERCENTILES}
    stats.update(mean=float(arr.mean()), stdev=float(arr.std()), min=float(arr.min()), max=float(arr.max()))
    stats["n"] = int(arr.size)
    return stats


def iteration_throughput(timings: list[RequestTiming]) -> dict[str, float]:
    """Throughputs of one iteration: tokens or requests / (last token time - first arrival)."""
    duration = max(t.token_times[-1] for t in timings) - min(t.arrival for t in timings)
    output_tokens = sum(len(t.token_times) for t in timings)
    input_tokens = sum(t.input_len for t in timings)
    return {
        "output_throughput_tok_s": output_tokens / duration,
        "total_token_throughput_tok_s": (input_tokens + output_tokens) / duration,
        "request_throughput_req_s": len(timings) / duration,
        "duration_s": duration,
    }


def check_output_counts(timings: list[RequestTiming]) -> None:
    wrong = [t for t in timings if len(t.token_times) != t.output_len]
    if wrong:
        t = wrong[0]
        raise RuntimeError(
            f"{len(wrong)} request(s) produced the wrong number of output tokens, e.g. {t.request_id}: "
            f"{len(t.token_times)} produced, {t.output_len} asked for"
        )


def meets_slo(t: RequestTiming, slo: dict[str, float]) -> bool:
    """vLLM's goodput: a request is good when it meets every SLO that is set (ttft_ms, tpot_ms, e2e_ms)."""
    if "ttft_ms" in slo and t.ttft * 1e3 > slo["ttft_ms"]:
        return False
    if "tpot_ms" in slo and t.tpot is not None and t.tpot * 1e3 > slo["tpot_ms"]:
        return False
    return not ("e2e_ms" in slo and t.e2e * 1e3 > slo["e2e_ms"])


def iteration_goodput(timings: list[RequestTiming], slo: dict[str, float]) -> dict[str, float]:
    """Good requests and their output tokens per second over the iteration's duration, and the share good."""
    good = [t for t in timings if meets_slo(t, slo)]
    duration = iteration_throughput(timings)["duration_s"]
    return {
        "goodput_req_s": len(good) / duration,
        "goodput_tok_s": sum(len(t.token_times) for t in good) / duration,
        "slo_attainment_pct": 100.0 * len(good) / len(timings),
    }


def per_second(times: list[float]) -> float | None:
    """Events per second over their own window: (n - 1) / (last - first); None for fewer than two or no spread."""
    if len(times) < 2 or max(times) == min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


def load_figures(timings: list[RequestTiming]) -> dict[str, float]:
    """Offered and achieved request rates of an open-loop run, per iteration, median over iterations.

    Offered: arrivals per second over the arrival window. Achieved: admissions per second over the admission
    window. An engine that keeps up admits at the rate requests arrive; one that does not falls behind.
    """
    offered, achieved = [], []
    for i in sorted({t.iteration for t in timings}):
        batch = [t for t in timings if t.iteration == i]
        o = per_second([t.arrival for t in batch])
        a = per_second([t.admitted for t in batch if t.admitted is not None])
        if o is not None and a is not None:
            offered.append(o)
            achieved.append(a)
    if not offered:
        return {}
    return {"offered_rate_req_s": statistics.median(offered), "achieved_rate_req_s": statistics.median(achieved)}


def per_gpu_figures(figures: Mapping[str, float], gpus: int) -> dict[str, float]:
    """Output throughput per GPU of an engine on `gpus` GPUs (tp_size x pp_size)."""
    return {"output_throughput_tok_s_per_gpu": figures["output_throughput_tok_s"] / gpus}


def benchmark_figures(timings: list[RequestTiming], slo: dict[str, float] | None = None) -> dict[str, float]:
    """Every per-request and per-run figure, flattened to `<figure>_<stat>` names. `slo` (any of ttft_ms, tpot_ms,
    e2e_ms) adds goodput."""
    check_output_counts(timings)
    per_request = {
        "ttft_ms": [t.ttft * 1e3 for t in timings],
        "tpot_ms": [t.tpot * 1e3 for t in timings if t.tpot is not None],
        "itl_ms": [gap * 1e3 for t in timings for gap in t.itls],
        "tokens_per_chunk": [n for t in timings for n in t.chunk_sizes],
        "e2e_latency_ms": [t.e2e * 1e3 for t in timings],
        "queue_ms": [t.queue * 1e3 for t in timings if t.queue is not None],
    }
    figures: dict[str, float] = {}
    for name, values in per_request.items():
        for stat, value in summarize(values).items():
            figures[f"{name}_{stat}"] = value
    iterations = sorted({t.iteration for t in timings})
    per_iteration = [iteration_throughput([t for t in timings if t.iteration == i]) for i in iterations]
    for name in THROUGHPUT_FIGURES:
        values = [it[name] for it in per_iteration]
        figures[name] = statistics.median(values)
        figures[f"{name}_min"] = min(values)
        figures[f"{name}_max"] = max(values)
    if slo:
        per_goodput = [iteration_goodput([t for t in timings if t.iteration == i], slo) for i in iterations]
        for name in per_goodput[0]:
            figures[name] = statistics.median(it[name] for it in per_goodput)
    figures["iterations"] = len(iterations)
    figures["output_tokens"] = sum(len(t.token_times) for t in timings)
    return figures


def decode_step_bytes(
    sizes: Mapping[str, float], vocab_size: int, batch_size: int, mean_context: float
) -> tuple[float, float]:
    """Bytes one decode step must read (the floor's numerator), and the same with every weight counted.

    A step reads every weight but the input embedding table, one row of that table per sequence, and each
    sequence's KV cache at its context length. gpt-fast's "bandwidth achieved" counts every weight instead; that
    count is kept beside it by name (sizes: sweep.model.source.model_sizes).
    """
    kv = batch_size * mean_context * sizes["kv_bytes_per_token"]
    table = sizes["input_embedding_bytes"]
    rows = batch_size * table / vocab_size
    return sizes["model_bytes"] - table + rows + kv, sizes["model_bytes"] + kv


def roofline_figures(
    sizes: Mapping[str, float],
    vocab_size: int,
    batch_size: int,
    mean_context: float,
    bandwidth: float,
    tpot_s: float,
    tp_size: int = 1,
) -> dict[str, float]:
    """Decode is memory-bound: its floor per step is the bytes it must read over the bandwidth that reads them.

    `bandwidth` is one board's. An engine split over tp_size GPUs reads each step's bytes on all of them at once
    (each its shard), so its floor is over tp_size x bandwidth; pipeline stages read their layers one after
    another within a step, so pipeline parallelism adds no bandwidth to a step and does not enter here.
    """
    read, all_weights = decode_step_bytes(sizes, vocab_size, batch_size, mean_context)
    bandwidth *= tp_size
    floor_s = read / bandwidth
    return {
        "decode_bytes_per_step": read,
        "decode_floor_ms": floor_s * 1e3,
        "roofline_efficiency": floor_s / tpot_s,
        "roofline_efficiency_all_weights": all_weights / bandwidth / tpot_s,
        "roofline_floor_tok_s": batch_size / floor_s,
    }
