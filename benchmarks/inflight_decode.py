"""compiled static against compiled in flight on one GPU: decode step time at batch 1 and 8 against the bandwidth
floor, every engine in one call on one checkpoint (conf/experiment/inflight_decode.yaml: Qwen2.5-7B's architecture,
random fp16 weights).

    python benchmarks/inflight_decode.py --work build/inflight --out benchmarks/results
    python benchmarks/inflight_decode.py --shape tiny --device cpu --compile-mode none --isl 32 --steps 8 \
        --engines static:2:2 inflight:2:1,2 --work build/inflight-cpu --out /tmp/x      # a rehearsal on the CPU

Engines (--engines), each started by sweep.open_engine as `python -m sweep` starts one (plan, engine cache, load),
compile_mode reduce-overhead (--compile-mode): by default static at max_batch_size 1 and at 8 (each captures its one
size) and in flight at max_batch_size 8 (capturing the powers of two up to it); a fourth field names the engine's
attn_implementation (default sdpa), e.g. `inflight:32:1,32:flex_attention` beside `inflight:32:1,32` compares decode
attention through FlexAttention with the default GEMMs. For each batch size b an engine serves
b requests of ISL --isl (this fills b rows of the cache with real keys and values; the in-flight engine's tokens are
compared with the static engine's), then `--steps` decode steps run back to back from column ISL, timed with CUDA
events (the median of `--repeats`), and the roofline efficiency as the run figure defines it (decode floor / step
time). In flight is timed at the attention span a server would pick for these steps and, beside it, at the whole
row. `--profile` adds each measurement's kernel table and, per step, kernel count, kernel time and idle time. The
Llama-3.1-8B figures: `--shape llama-3.1-8b --dtype bfloat16 --max-seq-len 1536 --engines static:1:1 inflight:16:1,16`
(with load_curve.py's --cache-dir, its engines are cache hits).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from sweep import compose, open_engine, token_match
from sweep.model import SHAPES

log = logging.getLogger("inflight_decode")
ENGINES = ("static:1:1", "static:8:8", "inflight:8:1,8")  # scheduler:max_batch_size:batches[:attn_implementation]


def parse_engine(text: str) -> tuple[str, int, list[int], str]:
    scheduler, max_batch, batches, *attn = text.split(":")
    return scheduler, int(max_batch), [int(b) for b in batches.split(",")], attn[0] if attn else "sdpa"


def engine_config(args, scheduler: str, max_batch: int, attn: str):
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    return compose(
        [
            "+experiment=inflight_decode",
            f"model.shape={args.shape}",
            f"backend.scheduler={scheduler}",
            f"engine.attn_implementation={attn}",
            f"device={args.device}",
            f"engine.dtype={dtype}",
            f"engine.compile_mode={args.compile_mode}",
            f"engine.max_batch_size={max_batch}",
            f"engine.max_input_len={args.isl}",
            f"engine.max_seq_len={args.max_seq_len or args.isl + args.steps + 32}",
            f"workload.num_requests={max_batch}",
            f"workload.input_len={args.isl}",
            f"cache_dir={args.cache_dir or args.work / 'engines_cache'}",
        ]
    )


def spans_to_measure(engine, scheduler: str, args) -> list[int | None]:
    """Static reads every column; in flight, the span a server would pick for these steps (their last column
    included) and, beside it, the whole row."""
    if scheduler == "static":
        return [None]
    spans = engine.manifest["attention_spans"]
    fit = next(s for s in spans if s >= args.isl + max(args.steps, 8))
    return [fit] if fit == spans[-1] else [fit, spans[-1]]


def measure_engine(
    args, scheduler: str, max_batch: int, batches: list[int], attn: str, static_tokens: dict
) -> tuple[list, str]:
    """Each batch size's decode steps on one engine, and the device's name; static engines leave their tokens in
    `static_tokens` for the in-flight ones to be compared with."""
    results = []
    with open_engine(engine_config(args, scheduler, max_batch, attn)) as engine:
        for batch in batches:
            rows = [g.token_ids for g in engine.generate(engine.requests[:batch])]
            for span in spans_to_measure(engine, scheduler, args):
                out: dict[str, Any] = {"scheduler": scheduler, "max_batch_size": max_batch, "attention": attn}
                out.update(engine.time_decode(batch, args.isl, args.steps, args.repeats, span))
                out.update(engine_start_s=engine.start_s, captured=engine.manifest["captured_batch_sizes"])
                if args.profile and (kernels := engine.profile_decode(batch, args.isl, 8, span)):
                    out["kernels_8_steps"] = kernels.pop("table")
                    out.update({k: kernels[k] for k in ("kernels_per_step", "kernel_ms_per_step", "span_ms_per_step")})
                if scheduler == "inflight" and batch in static_tokens:
                    out["tokens_vs_static"] = token_match(static_tokens[batch], rows)
                results.append(out)
                log.info("%s", {k: v for k, v in out.items() if k != "kernels_8_steps"})
            if scheduler == "static":
                static_tokens[batch] = rows
        gpu = engine.device_name
    return results, gpu


def table(gpu: str, args, results: list[dict]) -> str:
    lines = [
        f"{gpu}, {args.shape}, ISL {args.isl}, {args.steps} decode steps x {args.repeats} (median)",
        "| scheduler | attention | max_batch_size | batch | attention span | decode step ms | roofline eff. "
        "| tokens equal to static (exact seqs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        eff = f"{100 * r['roofline_efficiency']:.0f}%" if "roofline_efficiency" in r else "-"
        match = f"{r['tokens_vs_static']['exact_sequence_pct']:.0f}%" if "tokens_vs_static" in r else "-"
        lines.append(
            f"| {r['scheduler']} | {r['attention']} | {r['max_batch_size']} | {r['batch']} | {r['span']} "
            f"| {r['decode_step_ms']:.2f} "
            f"| {eff} | {match} |"
        )
    profiled = [r for r in results if "kernels_per_step" in r]
    if profiled:
        lines += [
            "",
            "Per decode step, from the profile (8 steps): idle = first kernel's start to last one's end, less kernels",
            "| scheduler | attention | batch | attention span | kernels | kernel ms | start to end ms | idle ms |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in profiled:
            k, span = r["kernel_ms_per_step"], r["span_ms_per_step"]
            lines.append(
                f"| {r['scheduler']} | {r['attention']} | {r['batch']} | {r['span']} | {r['kernels_per_step']:.0f} "
                f"| {k:.2f} "
                f"| {span:.2f} | {span - k:.2f} |"
            )
        for r in profiled:
            title = (
                f"{r['scheduler']} ({r['attention']}), batch {r['batch']}, attention span {r['span']}: "
                "GPU kernels of 8 decode steps"
            )
            lines += ["", title, "```", r["kernels_8_steps"], "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/inflight"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--shape", default="qwen2.5-7b", choices=list(SHAPES), help="the model architecture: tiny for a rehearsal"
    )
    parser.add_argument("--dtype", default=None, help="default: float16 on a GPU, float32 on a CPU")
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--profile", action="store_true", help="add each measurement's GPU kernel table to the .md")
    parser.add_argument("--engines", nargs="+", default=ENGINES, help="scheduler:max_batch_size:batches, in order")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: <work>/engines_cache")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: ISL + steps + 32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.work = args.work.resolve()
    results: list[dict] = []
    static_tokens: dict[int, list[list[int]]] = {}
    gpu = "cpu"
    for scheduler, max_batch, batches, attn in map(parse_engine, args.engines):
        measured, gpu = measure_engine(args, scheduler, max_batch, batches, attn, static_tokens)
        results += measured
    text = table(gpu, args, results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inflight_decode.json").write_text(json.dumps({"gpu": gpu, "results": results}, indent=2))
    (args.out / "inflight_decode.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
