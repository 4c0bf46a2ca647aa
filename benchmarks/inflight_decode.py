"""compiled static against compiled in flight on one GPU: decode step time at batch 1 and 8 against the bandwidth
floor, every engine in one call on one checkpoint (Qwen2.5-7B's architecture with random fp16 weights, as
gpu_compare.py).

    python benchmarks/inflight_decode.py --work build/inflight --out benchmarks/results
    python benchmarks/inflight_decode.py --small --device cpu --work build/inflight-cpu --out /tmp/x   # rehearsal

Engines (--engines), each started as `python -m sweep` starts one (sweep.job.plan: plan, engine cache, load),
compile_mode reduce-overhead (--compile-mode): by default static at max_batch_size 1 and at 8 (each captures its one
size) and in flight at max_batch_size 8 with cuda_graph_batch_sizes [1, 8]. For each batch size b an engine serves
b requests of ISL 512 (this fills b rows of the cache with real keys and values; the in-flight engine's tokens are
compared with the static engine's), then `--steps` decode steps run back to back at context 512, timed with CUDA events
(the median of `--repeats`), and the roofline efficiency as the run figure defines it (decode floor / step time).
In flight is timed at the attention span a server would pick for these steps and, beside it, at the whole row.
`--profile` adds each measurement's kernel table and, per step, kernel count, kernel time and idle time. The
Llama-3.1-8B figures in the README: `--llama DIR --max-seq-len 1536 --engines static:1:1 inflight:16:1,16`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import (  # noqa: E402
    QWEN25_7B,
    SMALL,
    decode_roofline,
    free_device_memory,
    make_checkpoint,
    start_backend,
    token_match,
)

log = logging.getLogger("inflight_decode")
ISL = 512
ENGINES = ("static:1:1", "static:8:8", "inflight:8:1,8")  # scheduler:max_batch_size:batches measured


def parse_engine(text: str) -> tuple[str, int, list[int]]:
    scheduler, max_batch, batches = text.split(":")
    return scheduler, int(max_batch), [int(b) for b in batches.split(",")]


def compose(checkpoint: Path, args, scheduler: str, max_batch: int):
    from sweep.job.compose import compose as compose_config

    dtype = ("bfloat16" if args.llama else "float16") if args.device == "cuda" else "float32"
    return compose_config(
        [
            "model=llama-3.1-8b" if args.llama else "model=qwen2.5-7b",
            f"model.path={checkpoint}",
            f"model.dtype={dtype}",
            "backend=compiled",
            f"backend.scheduler={scheduler}",
            f"device={args.device}",
            f"engine.dtype={dtype}",
            f"engine.compile_mode={args.compile_mode}",
            f"engine.max_batch_size={max_batch}",
            f"engine.max_seq_len={args.max_seq_len or ISL + args.steps + 32}",
            "engine.cuda_graph_batch_sizes=[1,8]" if max_batch == 8 else "engine.cuda_graph_batch_sizes=null",
            "workload=throughput",
            f"workload.num_requests={max_batch}",
            f"workload.input_len={ISL}",
            "workload.output_len=32",
            f"cache_dir={args.cache_dir or args.work / 'engines_cache'}",
            "tracker=none",
        ]
    )


def timed(run, reset, steps: int, repeats: int, cuda: bool) -> float:
    """Median ms per step of `steps` decode steps queued back to back (no host sync per token)."""
    import torch

    times = []
    for _ in range(repeats):
        reset()
        if cuda:
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / steps)
        else:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def kernel_profile(run, reset, steps: int) -> dict[str, Any]:
    """The GPU kernels of `steps` decode steps (kernels replayed from CUDA graphs included): their table, most time
    first, and per step the kernel count, the time kernels ran and the time from the first kernel's start to the last
    one's end (the difference is the GPU idle between kernels: launch gaps inside a replayed graph, or host waits)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "Activity Buffer Request"
    )
    busy_us = sum(end - start for start, end in kernels)
    span_us = kernels[-1][1] - kernels[0][0]
    return {
        "table": prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=90),
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms_per_step": busy_us / 1e3 / steps,
        "span_ms_per_step": span_us / 1e3 / steps,
    }


def measure(p, scheduler: str, batch: int, args, span: int | None) -> dict[str, Any]:
    """Decode steps of `batch` rows at context ISL; in flight, attending over `span` columns."""
    import torch

    backend, state = p.backend, p.backend.state
    cuda = p.device == "cuda"
    with torch.inference_mode():
        if scheduler == "static":
            run = backend.run_decode

            def reset() -> None:
                state.pad_len.zero_()
                state.input_pos.fill_(ISL)
        else:
            run = backend.scheduler.run_decode[(batch, span)]

            def reset() -> None:
                state.reset_rows()
                state.pos[:batch].fill_(ISL)
                state.live[:batch].fill_(1)

        step_ms = timed(run, reset, args.steps, args.repeats, cuda)
        kernels = kernel_profile(run, reset, 8) if args.profile and cuda else None
    out = {"scheduler": scheduler, "max_batch_size": state.batch, "batch": batch, "span": span or state.max_seq_len}
    out["decode_step_ms"] = step_ms
    if cuda:
        out.update(decode_roofline(p, batch, ISL + args.steps / 2, step_ms))
    if kernels:
        out["kernels_8_steps"] = kernels.pop("table")
        out.update(kernels)
    return out


def spans_to_measure(p, scheduler: str, args) -> list[int | None]:
    """Static reads every column; in flight, the span a server would pick for these steps (their last column
    included) and, beside it, the whole row (what decode read before attention spans)."""
    if scheduler == "static":
        return [None]
    spans = p.backend.scheduler.spans
    fit = next(s for s in spans if s >= ISL + max(args.steps, 8))
    return [fit] if fit == spans[-1] else [fit, spans[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/inflight"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model of the same structure (rehearsal)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--profile", action="store_true", help="add each measurement's GPU kernel table to the .md")
    parser.add_argument("--engines", nargs="+", default=ENGINES, help="scheduler:max_batch_size:batches, in order")
    # Reuse another benchmark's engines: load_curve.py's Llama checkpoint, cache and max_seq_len give cache hits.
    parser.add_argument("--llama", type=Path, default=None, help="a Llama-3.1-8B-shaped bf16 checkpoint to use")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.llama or make_checkpoint(
        work / ("qwen2.5-7b-random-fp16" if not args.small else "small-random"),
        SMALL if args.small else QWEN25_7B,
        args.device,
    )
    results: list[dict[str, Any]] = []
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    for scheduler, max_batch, batches in map(parse_engine, args.engines):
        start = time.perf_counter()
        p, entry = start_backend(compose(checkpoint, args, scheduler, max_batch))
        started_s = time.perf_counter() - start
        try:
            for batch in batches:
                rows = [g.token_ids for g in p.backend.generate(p.workload.measured[:batch])]
                for span in spans_to_measure(p, scheduler, args):
                    out = measure(p, scheduler, batch, args, span)
                    out.update(engine_start_s=started_s, captured=entry.manifest["captured_batch_sizes"])
                    if scheduler == "inflight" and ("static", batch) in tokens:
                        out["tokens_vs_static"] = token_match(tokens[("static", batch)], rows)
                    results.append(out)
                    log.info("%s", out)
                tokens[(scheduler, batch)] = rows
        finally:
            p.backend.close()
            free_device_memory()
    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    (args.out / "inflight_decode.json").write_text(json.dumps({"gpu": gpu, "results": results}, indent=2))
    lines = [
        f"{gpu}, torch {torch.__version__}, ISL {ISL}, {args.steps} decode steps x {args.repeats} (median)",
        "| scheduler | max_batch_size | batch | attention span | decode step ms | roofline eff. "
        "| tokens equal to static (exact seqs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        eff = f"{100 * r['roofline_efficiency']:.0f}%" if "roofline_efficiency" in r else "-"
        match = f"{r['tokens_vs_static']['exact_sequence_pct']:.0f}%" if "tokens_vs_static" in r else "-"
        lines.append(
            f"| {r['scheduler']} | {r['max_batch_size']} | {r['batch']} | {r['span']} | {r['decode_step_ms']:.2f} "
            f"| {eff} | {match} |"
        )
    if any("kernels_per_step" in r for r in results):
        lines += [
            "",
            "Per decode step, from the profile (8 steps): idle = first kernel's start to last one's end, less kernels",
            "| scheduler | batch | attention span | kernels | kernel ms | start to end ms | idle ms |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results:
            if "kernels_per_step" in r:
                k, span, count = r["kernel_ms_per_step"], r["span_ms_per_step"], r["kernels_per_step"]
                cells = f"{r['span']} | {count:.0f} | {k:.2f} | {span:.2f} | {span - k:.2f}"
                row = f"| {r['scheduler']} | {r['batch']} | {cells} |"
                lines.append(row)
    for r in results:
        if "kernels_8_steps" in r:
            lines += [
                "",
                f"{r['scheduler']}, batch {r['batch']}, attention span {r['span']}: GPU kernels of 8 decode steps",
                "```",
                r["kernels_8_steps"],
                "```",
            ]
    (args.out / "inflight_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
