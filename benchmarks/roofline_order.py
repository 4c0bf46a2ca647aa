"""Does roofline efficiency depend on which backend ran first? The same compiled engine, read after an hf run and
after a compiled run, in one call, on Qwen2.5-7B's architecture with random fp16 weights
(conf/experiment/gpu_compare.yaml).

    python benchmarks/roofline_order.py --work build/roofline_order --out benchmarks/results

Two passes through sweep.run, each with an engine cache of its own, so that each pass's first run measures the
device bandwidth afresh (a run measures it once per cache, before its engine loads):
- hf first: hf (measures the bandwidth), then compiled (reads it);
- compiled first: compiled (measures the bandwidth, after the first pass's runs warmed the card), then hf.
Prints the table and the check (compiled's roofline_efficiency in the two passes within 2%), writes the JSON. The
roofline figures exist on a GPU only: without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sweep import compose, run
from sweep.model import SHAPES

FIGURES = (
    "tpot_ms_p50",
    "device_bandwidth_gb_s",
    "device_bandwidth_spread_pct",
    "decode_bytes_per_step",
    "roofline_efficiency",
    "roofline_efficiency_all_weights",
)


def one_run(args, first: str, backend: str) -> dict:
    work = args.work / f"{first}-first"
    cfg = compose(
        [
            "+experiment=gpu_compare",
            f"model.shape={args.shape}",
            f"backend={backend}",
            *(["backend.scheduler=static"] if backend == "compiled" else []),
            "device=cuda",
            "workload=latency",
            f"workload.num_requests={args.requests}",
            "workload.iterations=1",
            f"workload.input_len={args.isl}",
            f"engine.max_input_len={args.isl}",
            f"engine.max_seq_len={args.isl + 128}",
            f"cache_dir={work / 'engines_cache'}",
            f"tracker.uri=sqlite:///{args.work / 'mlruns' / 'mlflow.db'}",
            f"tracker.run_name={backend}-after-{first}-first",
        ]
    )
    try:
        return {"first": first, "backend": backend, "error": None, "figures": run(cfg).figures}
    except Exception as exc:  # one failed run must not cost the other pass; the error goes into the table
        logging.exception("%s failed", backend)
        return {"first": first, "backend": backend, "error": f"{type(exc).__name__}: {exc}", "figures": {}}


def table(runs: list[dict]) -> str:
    lines = [
        "| first run | backend | P50 TPOT (ms) | bandwidth (GB/s) | spread (%) | bytes/step (GB) "
        "| efficiency | efficiency, all weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        cells = [r["figures"].get(k) for k in FIGURES]
        if None in cells:
            lines.append(f"| {r['first']} | {r['backend']} | {r['error'] or 'no roofline figures'} |")
            continue
        tpot, bw, spread, step_bytes, eff, eff_all = cells
        lines.append(
            f"| {r['first']} | {r['backend']} | {tpot:.2f} | {bw:.0f} | {spread:.1f} | {step_bytes / 1e9:.2f} "
            f"| {100 * eff:.1f}% | {100 * eff_all:.1f}% |"
        )
    compiled = {r["first"]: r["figures"].get("roofline_efficiency") for r in runs if r["backend"] == "compiled"}
    if len(compiled) == 2 and None not in compiled.values():
        diff = 100 * abs(compiled["hf"] - compiled["compiled"]) / compiled["hf"]
        lines.append(
            f"\ncompiled efficiency after an hf run {100 * compiled['hf']:.1f}%, after a compiled run "
            f"{100 * compiled['compiled']:.1f}%: {diff:.2f}% apart, {'within' if diff < 2 else 'NOT within'} 2%"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/roofline_order"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument(
        "--shape", default="qwen2.5-7b", choices=list(SHAPES), help="the model architecture: tiny for a rehearsal"
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("roofline_order.py needs a CUDA GPU: roofline figures are measured on a GPU only", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args.work = args.work.resolve()
    runs = [one_run(args, order[0], backend) for order in (("hf", "compiled"), ("compiled", "hf")) for backend in order]
    text = table(runs)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline_order.json").write_text(json.dumps(runs, indent=2, default=str))
    (args.out / "roofline_order.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
