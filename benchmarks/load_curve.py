"""Latency-throughput curves and the highest sustainable rate under one SLO, every engine in one call.

    python benchmarks/load_curve.py --work build/load_curve --out benchmarks/results \
        --variant hf=backend=hf --variant compiled=backend=compiled --start-rate 1 --max-rate 16

For each variant (a name and its overrides), one max-rate search through the CLI, as a user runs it:

    python -m sweep -m search=max_rate +experiment=load_curve <variant's overrides> hydra.sweeper.start_rate=...

conf/experiment/load_curve.yaml holds what the variants share: Llama-3.1-8B's architecture with random bf16 weights
(written once under --work), seeded normal lengths (mean 512 in / 128 out), the SLO. The search (hydra/sweeper=max_rate)
offers doubling rates from --start-rate until the SLO breaks, then bisects the bracket: its probes are the curve, and
the highest rate that met the SLO is the answer. Each probe is a job of the sweep; its figures are read from the job's
result file (sweep.multirun.sweeper_api.read_result). Prints the tables and writes them with the raw results to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweep.model import SHAPES
from sweep.multirun.sweeper_api import RESULT_FILE, read_result

log = logging.getLogger("load_curve")
COLUMNS = ("achieved_rate_req_s", "output_throughput_tok_s", "ttft_ms_p99", "tpot_ms_p99", "queue_ms_p99")


def search(args, name: str, overrides: list[str]) -> dict[str, Any]:
    """One variant's max-rate search; its probes, in the order they ran."""
    sweep_dir = args.work / name
    command = [
        *(sys.executable, "-m", "sweep", "-m", "search=max_rate", "+experiment=load_curve"),
        f"model.shape={args.shape}",
        f"device={args.device}",
        *([] if args.device == "cuda" else ["engine.dtype=float32"]),
        f"slo.ttft_ms={args.slo_ttft_ms}",
        f"slo.tpot_ms={args.slo_tpot_ms}",
        f"cache_dir={args.work / 'engines_cache'}",
        f"tracker.uri=sqlite:///{args.work / 'mlruns' / 'mlflow.db'}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.start_rate={args.start_rate}",
        f"hydra.sweeper.max_rate={args.max_rate}",
        f"hydra.sweeper.max_probes={args.max_probes}",
        f"hydra.sweeper.attainment={args.attainment}",
        *overrides,
        *args.extra,
    ]
    log.info("%s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    error = None
    if done.returncode != 0:  # a failed variant must not cost the others: the probes it finished still count
        error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log.error("%s failed: %s", name, error)
    probes = []
    jobs = sorted((d for d in sweep_dir.glob("*") if (d / RESULT_FILE).is_file()), key=lambda d: int(d.name))
    for job in jobs:
        figures = read_result(job).figures
        if figures:  # a job refused before it ran has none
            rate = OmegaConf.load(job / ".hydra" / "config.yaml").workload.request_rate
            probes.append({"variant": name, "rate": rate, "figures": figures})
    sustained = [p["rate"] for p in probes if p["figures"]["slo_attainment_pct"] >= args.attainment]
    return {"probes": probes, "max_rate": max(sustained, default=0.0), "error": error}


def table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"SLO: TTFT <= {s['slo_ttft_ms']:g} ms and TPOT <= {s['slo_tpot_ms']:g} ms; sustained = SLO attainment >= "
        f"{s['attainment']:g}%. {s['shape']} on {results['gpu']}; the rest as conf/experiment/load_curve.yaml "
        f"{' '.join(s['extra'])}.",
        "",
        "| variant | offered (req/s) | achieved (req/s) | output tok/s | TTFT P99 (ms) | TPOT P99 (ms) "
        "| queue P99 (ms) | SLO attainment (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, variant in results["variants"].items():
        for p in sorted(variant["probes"], key=lambda p: p["rate"]):
            f = p["figures"]
            cells = " | ".join("–" if f.get(k) is None else f"{f[k]:.1f}" for k in (*COLUMNS, "slo_attainment_pct"))
            lines.append(f"| {name} | {p['rate']:g} | {cells} |")
    lines += [
        "",
        "| variant | max sustainable rate (req/s) | vs first variant | probes |",
        "| --- | ---: | ---: | ---: |",
    ]
    first = None
    for name, variant in results["variants"].items():
        first = first or variant["max_rate"]
        ratio = f"{variant['max_rate'] / first:.2f}×" if first else "–"
        failed = f" (stopped: {variant['error']})" if variant["error"] else ""
        lines.append(f"| {name} | {variant['max_rate']:g}{failed} | {ratio} | {len(variant['probes'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/load_curve"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--variant", action="append", default=[], help="name=override[,override...]")
    parser.add_argument("--start-rate", type=float, default=1.0)
    parser.add_argument("--max-rate", type=float, default=64.0)
    parser.add_argument("--max-probes", type=int, default=8, help="runs per variant: the curve and the bisection")
    parser.add_argument("--attainment", type=float, default=99.0, help="SLO attainment (%%) a sustained rate meets")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--shape", default="llama-3.1-8b", choices=list(SHAPES), help="the model architecture: tiny for a rehearsal"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work = args.work.resolve()
    variants = dict(v.split("=", 1) for v in args.variant) or {"hf": "backend=hf", "compiled": "backend=compiled"}
    gpu = "cpu"
    if args.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    settings = {k: getattr(args, k) for k in ("shape", "attainment", "slo_ttft_ms", "slo_tpot_ms", "extra")}
    results: dict[str, Any] = {"settings": settings, "gpu": gpu, "variants": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, joined in variants.items():
        results["variants"][name] = search(args, name, joined.split(","))
        (args.out / "load_curve.json").write_text(json.dumps(results, indent=2, default=str))  # a cut run keeps it
    text = table(results)
    (args.out / "load_curve.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
