"""Latency-throughput curves and the highest sustainable rate under one SLO, every engine in one call.

    python benchmarks/load_curve.py --work build/load_curve --out benchmarks/results \
        --variant hf=backend=hf --variant compiled=backend=compiled --rates 1 2 4 8 16

Steps (each run goes through sweep.run, the function `python -m sweep` runs, into an MLflow store under
--work):
1. write a Llama-3.1-8B-shaped checkpoint with random bf16 weights once (--small: a tiny one of the same
   structure, to rehearse on a CPU); speed does not depend on weight values when EOS is ignored;
2. for each variant (a name and its overrides), one run per offered rate: workload=rate, seeded normal lengths
   (mean 512 in / 128 out), the SLO given;
3. per variant, bisect between the highest rate that met the SLO and the lowest that did not
   (hydra_plugins/sweep_max_rate_sweeper's next_rate) for --refine more runs;
4. print the table, and write it with the raw results under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_compare import make_checkpoint  # noqa: E402

from hydra_plugins.sweep_max_rate_sweeper._impl import Probe, max_sustainable, next_rate  # noqa: E402
from sweep import run  # noqa: E402
from sweep.job.compose import compose  # noqa: E402

log = logging.getLogger("load_curve")

# Llama-3.1-8B's architecture (../shared/gpu.md): 8.03e9 parameters, 16.06 GB in bf16.
LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
SMALL = dict(
    LLAMA_31_8B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=4096,
)  # fmt: skip
ATTAINMENT = 99.0


def run_point(args, checkpoint: Path, name: str, overrides: list[str], rate: float) -> dict[str, Any]:
    """One offered rate on one variant; its figures read back from MLflow."""
    from mlflow.tracking import MlflowClient

    db = args.work / "mlruns" / "mlflow.db"
    run_name = f"{name}-rate{rate:g}"
    cfg = compose([
        f"model.path={checkpoint}", "model.dtype=bfloat16", f"device={args.device}",
        f"engine.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"engine.max_batch_size={args.max_batch_size}", "engine.max_input_len=1024", "engine.max_seq_len=1536",
        "workload=rate", f"workload.request_rate={rate}", f"workload.num_requests={args.requests}",
        f"workload.warmup_requests={args.warmup}", "workload.iterations=1", "workload.length_distribution=normal",
        f"workload.input_len={args.isl}", f"workload.input_len_std={args.isl / 4}", f"workload.output_len={args.osl}",
        f"workload.output_len_std={args.osl / 4}", f"slo.ttft_ms={args.slo_ttft_ms}", f"slo.tpot_ms={args.slo_tpot_ms}",
        f"cache_dir={args.work / 'engines_cache'}", f"tracker.uri=sqlite:///{db}", "tracker.experiment=load_curve",
        f"tracker.run_name={run_name}", *overrides,
    ])  # fmt: skip
    start, error = time.perf_counter(), None
    try:
        run(cfg)
    except Exception as exc:  # one failed point must not cost the others; the error goes into the results
        log.exception("%s failed", run_name)
        error = f"{type(exc).__name__}: {exc}"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("load_curve")
    runs = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = '{run_name}'", order_by=["start_time DESC"], max_results=1
    )
    figures = dict(runs[0].data.metrics) if runs else {}
    return {"variant": name, "rate": rate, "error": error, "wall_s": time.perf_counter() - start,
            "saturated": runs[0].data.tags.get("saturated") if runs else None, "figures": figures}  # fmt: skip


def attainment(point: dict[str, Any]) -> float:
    return point["figures"].get("slo_attainment_pct", 0.0) if not point["error"] else 0.0


def table(results: dict[str, Any]) -> str:
    lines = [
        f"SLO: TTFT <= {results['slo_ttft_ms']:g} ms and TPOT <= {results['slo_tpot_ms']:g} ms; sustained = SLO "
        f"attainment >= {ATTAINMENT:g}%. {results['requests']} requests per point, ISL ~{results['isl']} / OSL "
        f"~{results['osl']} (normal, seeded), max_batch_size {results['max_batch_size']}, on {results['gpu']}.",
        "",
        "| variant | offered (req/s) | achieved (req/s) | output tok/s | TTFT P99 (ms) | TPOT P99 (ms) "
        "| queue P99 (ms) | SLO attainment | saturated |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in sorted(results["points"], key=lambda p: (p["variant"], p["rate"])):
        f = p["figures"]
        cells = [f.get(k) for k in ("achieved_rate_req_s", "output_throughput_tok_s", "ttft_ms_p99", "tpot_ms_p99",
                                    "queue_ms_p99", "slo_attainment_pct")]  # fmt: skip
        shown = " | ".join("–" if v is None else f"{v:.1f}" for v in cells)
        lines.append(f"| {p['variant']} | {p['rate']:g} | {shown} | {p['saturated'] or p['error'] or '–'} |")
    lines += [
        "",
        "| variant | max sustainable rate (req/s) | vs first variant | probes |",
        "| --- | ---: | ---: | ---: |",
    ]
    first = None
    for name, best in results["max_rate"].items():
        first = first or best["rate"]
        ratio = f"{best['rate'] / first:.2f}×" if first else "–"
        lines.append(f"| {name} | {best['rate']:g} | {ratio} | {best['probes']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "load_curve")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--variant", action="append", default=[], help="name=override[,override...]")
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--refine", type=int, default=2, help="bisection runs per variant after the curve")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model of the same structure (rehearsal)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = dict(v.split("=", 1) for v in args.variant) or {"hf": "backend=hf", "compiled": "backend=compiled"}
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.work / ("small" if args.small else "llama-3.1-8b"),
                                 SMALL if args.small else LLAMA_31_8B, args.device, "llama", "bfloat16")  # fmt: skip
    gpu = "cpu"
    if args.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    results: dict[str, Any] = {**{k: getattr(args, k) for k in ("requests", "isl", "osl", "max_batch_size",
                               "slo_ttft_ms", "slo_tpot_ms")}, "gpu": gpu, "points": [], "max_rate": {}}  # fmt: skip
    for name, joined in variants.items():
        overrides = joined.split(",")
        probes = []
        for rate in args.rates:
            point = run_point(args, checkpoint, name, overrides, rate)
            results["points"].append(point)
            probes.append(Probe(rate, attainment(point), attainment(point) >= ATTAINMENT))
        for _ in range(args.refine):  # bisect inside the bracket the curve found
            rate = next_rate(probes, args.rates[0], 0.05, max(args.rates))
            if rate is None or rate in [p.rate for p in probes]:
                break
            point = run_point(args, checkpoint, name, overrides, round(rate, 3))
            results["points"].append(point)
            probes.append(Probe(point["rate"], attainment(point), attainment(point) >= ATTAINMENT))
        results["max_rate"][name] = {"rate": max_sustainable(probes), "probes": len(probes)}
        (args.out / "load_curve.json").parent.mkdir(parents=True, exist_ok=True)
        (args.out / "load_curve.json").write_text(json.dumps(results, indent=2, default=str))  # a cut run keeps it
    text = table(results)
    (args.out / "load_curve.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
