"""Does roofline efficiency depend on which backend ran first? The same compiled engine, read after an hf run and
after a compiled run, in one call, on Qwen2.5-7B's architecture with random fp16 weights (issue 16).

    python benchmarks/roofline_order.py --work build/roofline_order --out benchmarks/results

Two passes through sweep.run (what `python -m sweep` runs), one engine cache and one MLflow store; the
cached device bandwidth is deleted before each pass, so each pass's first run measures it afresh:
- hf first: hf (measures the bandwidth), then compiled (builds the engine; reads the cached bandwidth);
- compiled first: compiled (engine-cache hit; measures the bandwidth after the first pass's runs), then hf.
Prints the table and the check (compiled's roofline_efficiency in the two passes within 2%), writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_compare import QWEN25_7B, compose, make_checkpoint, sweep_run  # noqa: E402

FIGURES = (
    "tpot_ms_p50",
    "device_bandwidth_gb_s",
    "device_bandwidth_spread_pct",
    "decode_bytes_per_step",
    "roofline_efficiency",
    "roofline_efficiency_all_weights",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/roofline_order"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.work / "qwen2.5-7b-random", QWEN25_7B, "cuda")
    runs = []
    for order in (("hf", "compiled"), ("compiled", "hf")):
        shutil.rmtree(args.work / "engines_cache" / "device", ignore_errors=True)  # measure the bandwidth afresh
        for position, backend in enumerate(order):
            cfg = compose(checkpoint, args.work, "cuda", backend, 1, args.isl, args.requests, 1, [])
            run = sweep_run(cfg, args.work)
            runs.append({"first": order[0], "position": position, **run})
    lines = [
        "| first run | backend | P50 TPOT (ms) | bandwidth (GB/s) | spread (%) | bytes/step (GB) "
        "| efficiency | efficiency, all weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        f = r["figures"]
        cells = [f.get(k) for k in FIGURES]
        if None in cells:
            lines.append(f"| {r['first']} | {r['backend']} | {r['status']}: {r['error']} |")
            continue
        tpot, bw, spread, step_bytes, eff, eff_all = cells
        lines.append(
            f"| {r['first']} | {r['backend']} | {tpot:.2f} | {bw:.0f} | {spread:.1f} | {step_bytes / 1e9:.2f} "
            f"| {100 * eff:.1f}% | {100 * eff_all:.1f}% |"
        )
    compiled = {r["first"]: r["figures"].get("roofline_efficiency") for r in runs if r["backend"] == "compiled"}
    if None not in compiled.values():
        diff = 100 * abs(compiled["hf"] - compiled["compiled"]) / compiled["hf"]
        lines.append(
            f"\ncompiled efficiency after an hf run {100 * compiled['hf']:.1f}%, after a compiled run "
            f"{100 * compiled['compiled']:.1f}%: {diff:.2f}% apart, {'within' if diff < 2 else 'NOT within'} 2%"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline_order_h200.json").write_text(json.dumps(runs, indent=2, default=str))
    (args.out / "roofline_order_h200.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
