"""Where a compiled engine's build time goes: static against in flight, one fresh build each, in one call.

    python benchmarks/inflight_build_profile.py --llama DIR --out OUT            # on the GPU machine
    python benchmarks/inflight_build_profile.py --small --device cpu --compile-mode default --out /tmp/x

Issue 10's open question: on an H200 the in-flight engine under reduce-overhead (Llama-3.1-8B shape) did not finish
its build in 6 minutes while the static one takes ~84 s. Each engine is built into an empty cache (as `python -m
sweep` builds it: sweep.plan, engine cache, load) and reports its wall time, how many graphs Dynamo compiled, and
torch's own per-phase compile times (torch._dynamo.utils.compile_times), so the next GPU call shows which graph or
phase takes the time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import make_checkpoint, start_backend  # noqa: E402
from load_curve import LLAMA_31_8B, SMALL  # noqa: E402

log = logging.getLogger("inflight_build_profile")


def compose(args, checkpoint: Path, scheduler: str, cache_dir: Path):
    from sweep.compose import compose as compose_config

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    return compose_config([
        "model=llama-3.1-8b", f"model.path={checkpoint}", f"model.dtype={dtype}", f"engine.dtype={dtype}",
        f"device={args.device}", "backend=compiled", f"backend.scheduler={scheduler}",
        f"engine.compile_mode={args.compile_mode}", f"engine.max_batch_size={args.max_batch_size}",
        f"engine.max_seq_len={args.max_seq_len}", "workload=throughput", "workload.num_requests=1",
        "workload.input_len=16", "workload.output_len=4", f"cache_dir={cache_dir}", "tracker=none",
    ])  # fmt: skip


def build(args, checkpoint: Path, scheduler: str) -> dict:
    import torch
    from torch._dynamo.utils import compile_times, counters

    counters.clear()
    with tempfile.TemporaryDirectory(prefix="build-profile-") as cache_dir:
        start = time.perf_counter()
        p, entry = start_backend(compose(args, checkpoint, scheduler, Path(cache_dir)))
        wall_s = time.perf_counter() - start
        figures = p.backend.engine_figures()
        times = compile_times(repr="str", aggregate=True)  # before close(): it resets dynamo, and these with it
        p.backend.close()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "scheduler": scheduler,
        "wall_s": wall_s,
        "compile_and_warmup_s": figures.get("compile_and_warmup_s"),
        "graphs_compiled": counters["stats"]["unique_graphs"],
        "captured_batch_sizes": entry.manifest.get("captured_batch_sizes"),
        "compile_times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama", type=Path, default=None, help="a Llama-3.1-8B-shaped checkpoint (else written)")
    parser.add_argument("--work", type=Path, default=Path("build/build_profile"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model of the same structure (rehearsal)")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--schedulers", nargs="+", default=["static", "inflight"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work.resolve()
    checkpoint = args.llama or make_checkpoint(
        work / ("small" if args.small else "llama-3.1-8b"), SMALL if args.small else LLAMA_31_8B, args.device,
        "llama", "bfloat16",
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for scheduler in args.schedulers:
        results.append(build(args, checkpoint, scheduler))
        log.info("%s: %.1f s, %d graphs", scheduler, results[-1]["wall_s"], results[-1]["graphs_compiled"])
        (args.out / "build_profile.json").write_text(json.dumps(results, indent=2))  # a cut call keeps the first
    lines = [
        f"compile_mode {args.compile_mode}, max_batch_size {args.max_batch_size}, max_seq_len {args.max_seq_len}, "
        f"device {args.device}",
        "",
        "| scheduler | build + load (s) | compile and warm-up (s) | graphs compiled | decode sizes captured |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['scheduler']} | {r['wall_s']:.1f} | {r['compile_and_warmup_s']:.1f} | {r['graphs_compiled']} "
            f"| {r['captured_batch_sizes']} |"
        )
    for r in results:
        lines += ["", f"torch's compile times, {r['scheduler']}:", "```", r["compile_times"], "```"]
    (args.out / "build_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
