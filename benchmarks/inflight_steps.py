"""Where the compiled in-flight engine's time goes under load: each step's decode and prompt-chunk time, and the
gaps between steps, while it serves a workload as a run serves it.

    python benchmarks/inflight_steps.py model.shape=llama-3.1-8b device=cuda engine.dtype=bfloat16 \
        workload=rate workload.request_rate=9 workload.burstiness=0.5 workload.length_distribution=normal \
        workload.input_len=768 workload.input_len_std=256 workload.output_len=192 workload.output_len_std=64 \
        workload.num_requests=64 engine.max_batch_size=32 engine.max_seq_len=2048 [--profile]
    python benchmarks/inflight_steps.py workload=rate workload.request_rate=50 workload.num_requests=8  # CPU rehearsal

The arguments are `python -m sweep` overrides (backend=compiled and tracker=none are given). The engine starts as a
run starts it (sweep.open_engine: checks, engine cache, load), serves the workload's warm-up requests all at once,
then its measured requests with the scenario's arrivals. Each step's phases come from marks the scheduler records
in stream order (CUDA events on a GPU), so a phase that waited for the host shows it. Steps are grouped by what they
did: decode only, decode and prompt chunks, prompt chunks only. On a GPU, each decode phase is set beside the floor
of what its graph reads (its rows' weights share and keys and values over its span, at the bandwidth measured
before the engine loaded); `--profile` adds torch.profiler's top GPU kernels over the measured serve, and
`--cudnn-prompts` lets prompt attention run cuDNN's SDPA kernel again, to see what that kernel costs under traffic.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch.nn.attention import SDPBackend

from sweep import compose, open_engine
from sweep.backends.compiled import patches
from sweep.backends.compiled.inflight import Marks, step_phases
from sweep.measure.benchmark import request_stream
from sweep.measure.metrics import roofline_figures
from sweep.workload.stream import RequestStream

KINDS = ("decode only", "decode + prompt", "prompt only")


def kind(step) -> str:
    if step.decoded and step.prefilled:
        return "decode + prompt"
    return "decode only" if step.decoded else "prompt only"


def serve(backend, stream: RequestStream, max_batch: int, profile: bool):
    """Serve the stream; the wall seconds and, with `profile`, the torch.profiler that watched it."""
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity

        profiler = torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        profiler.start()
    start = time.perf_counter()
    stream.start()
    backend.serve_tokens(stream, max_batch)
    wall = time.perf_counter() - start
    if profiler is not None:
        torch.cuda.synchronize()
        profiler.stop()
    return wall, profiler


def decode_floor_ms(engine, rows: int, span: int) -> float | None:
    if not engine.bandwidth or not rows:
        return None
    p = engine.plan
    figures = roofline_figures(p.sizes, p.model.shape.vocab_size, rows, span, engine.bandwidth["bytes_per_s"], 1.0)
    return figures["decode_floor_ms"]


def table(engine, steps, phases, wall: float) -> str:
    mean = lambda values: statistics.fmean(values) if values else 0.0  # noqa: E731
    lines = [
        f"{engine.device_name}, {engine.plan.model.name}, {len(engine.requests)} requests, "
        f"{len(steps)} steps in {wall:.2f} s, decode attention {engine.plan.backend.cfg.engine.attn_implementation}, "
        "prompt attention on " + ", ".join(kernel.name for kernel in patches.PROMPT_KERNELS),
        "| step kind | steps | decode rows (graph) | span | prompt tokens | decode ms | floor of its reads ms "
        "| prompt ms | gap before ms | share of wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in KINDS:
        picked = [(s, ph) for s, ph in zip(steps, phases) if kind(s) == name]
        if not picked:
            continue
        rows = mean([s.graph_rows for s, _ in picked])
        span = mean([s.span for s, _ in picked])
        floors = [decode_floor_ms(engine, s.graph_rows, s.span) for s, _ in picked if s.decoded]
        floor = f"{mean(floors):.2f}" if floors and None not in floors else "-"
        busy = sum(ph["decode_ms"] + ph["prefill_ms"] + ph["gap_ms"] for _, ph in picked) / 1e3
        lines.append(
            f"| {name} | {len(picked)} | {rows:.1f} | {span:.0f} | {mean([s.prefilled for s, _ in picked]):.0f} "
            f"| {mean([ph['decode_ms'] for _, ph in picked]):.2f} | {floor} "
            f"| {mean([ph['prefill_ms'] for _, ph in picked]):.2f} | {mean([ph['gap_ms'] for _, ph in picked]):.2f} "
            f"| {100 * busy / wall:.0f}% |"
        )
    totals = {k: sum(ph[k] for ph in phases) / 1e3 for k in ("decode_ms", "prefill_ms", "gap_ms")}
    lines.append("")
    lines.append(
        f"Of {wall:.2f} s serving: decode {totals['decode_ms']:.2f} s, prompt chunks {totals['prefill_ms']:.2f} s, "
        f"gaps between steps {totals['gap_ms']:.2f} s, before the first step and after the last "
        f"{wall - sum(totals.values()):.2f} s."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="python -m sweep overrides")
    parser.add_argument("--profile", action="store_true", help="a GPU kernel table of the measured serve")
    parser.add_argument("--cudnn-prompts", action="store_true", help="let prompt attention run cuDNN's SDPA kernel")
    args = parser.parse_args()
    if args.cudnn_prompts:
        patches.PROMPT_KERNELS.append(SDPBackend.CUDNN_ATTENTION)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = compose(["backend=compiled", "backend.scheduler=inflight", "tracker=none", *args.overrides])
    with open_engine(cfg) as engine, torch.inference_mode():
        backend, workload = engine.plan.backend, engine.plan.workload
        max_batch = cfg.engine.max_batch_size
        if workload.warmup:
            warm = RequestStream(workload.warmup, offsets=[0.0] * len(workload.warmup))
            warm.start()
            backend.serve_tokens(warm, max_batch)
        backend.scheduler.marks = Marks(engine.plan.device == "cuda")  # the measured serve's steps only
        stream = request_stream(workload.measured, cfg.workload, iteration=0)
        wall, profiler = serve(backend, stream, max_batch, args.profile and engine.plan.device == "cuda")
        steps = backend.scheduler.steps
        phases = step_phases(steps, backend.scheduler.marks)
        print(table(engine, steps, phases, wall))
        if profiler is not None:
            print("\nGPU kernels of the measured serve, by total time:")
            print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
