"""hf (eager) against compiled on Qwen2.5-7B's architecture with random fp16 weights (conf/experiment/gpu_compare.yaml),
through sweep's Python API.

    python benchmarks/gpu_compare.py --work build/gpu_compare --out benchmarks/results [--batches 1 8] [--isl 128 512]
    python benchmarks/gpu_compare.py --device cpu --shape tiny --batches 1 2 --isl 16 --osl 8 \
        --extra engine.compile_mode=none          # a rehearsal on the CPU (no roofline, no kernel profile)

Steps, each printed and saved as it finishes (a run cut short keeps what it did):
1. for each batch size and input length, hf then compiled: sweep.run on the experiment's config, recording into an
   MLflow store under --work (the first run writes the random-weight checkpoint under --work, once); batch 1 is the
   latency scenario, larger batches the throughput scenario; one engine per batch size (max_seq_len holds the
   longest workload), so the second input length is an engine-cache hit;
2. per batch size, the compiled engine once more (a cache hit, sweep.open_engine): its tokens for the batch's prompts
   against hf's, then decode alone at the first input length, steps back to back, and on a GPU its roofline and
   kernel profile (kernel time against gaps, the share of each kind of kernel);
3. the table (P50 latency, TTFT, tok/s, GPU utilisation, peak memory, speedup vs hf, roofline efficiency) and the
   results JSON into --out, with the MLflow store as mlruns.tar.gz.

`--report A.json [B.json ...]` merges result files written by earlier calls and prints/writes the table only.
"""

from __future__ import annotations

import argparse
import json
import logging
import tarfile
import time
from pathlib import Path
from typing import Any

from sweep import compose, open_engine, run, token_match
from sweep.model import SHAPES

log = logging.getLogger("gpu_compare")


def overrides(args, backend: str, batch: int, isl: int, requests: int) -> list[str]:
    """The experiment's config for one backend, batch size and input length."""
    workload = (
        ["workload=latency", f"workload.num_requests={requests}"]
        if batch == 1
        else [
            "workload=throughput",
            f"workload.num_requests={requests * batch}",
            f"workload.warmup_requests={batch}",
            f"workload.batch_size={batch}",
        ]
    )
    return [
        "+experiment=gpu_compare",
        f"model.shape={args.shape}",
        f"backend={backend}",
        # The table's compiled engine runs static waves: decode alone drives that engine's batch.
        *(["backend.scheduler=static"] if backend == "compiled" else []),
        f"device={args.device}",
        *([] if args.device == "cuda" else ["engine.dtype=float32"]),
        f"engine.max_batch_size={batch}",
        f"engine.max_input_len={max(args.isl)}",
        f"engine.max_seq_len={max(args.isl) + args.osl}",
        *workload,
        f"workload.input_len={isl}",
        f"workload.output_len={args.osl}",
        f"workload.iterations={args.iterations}",
        f"cache_dir={args.work / 'engines_cache'}",
        f"tracker.uri=sqlite:///{args.work / 'mlruns' / 'mlflow.db'}",
        f"tracker.run_name={backend}-b{batch}-isl{isl}",
        *args.extra,
    ]


def measure(args, backend: str, batch: int, isl: int) -> dict[str, Any]:
    cfg = compose(overrides(args, backend, batch, isl, args.requests))
    row: dict[str, Any] = {"backend": backend, "batch": batch, "isl": isl, "osl": args.osl}
    row["compile_mode"] = cfg.engine.compile_mode if backend == "compiled" else None
    start = time.perf_counter()
    try:
        result = run(cfg)
    except Exception as exc:  # one failed variant must not cost the others; the error goes into the results
        log.exception("run failed")
        return {**row, "status": "FAILED", "error": f"{type(exc).__name__}: {exc}", "figures": {}}
    return {
        **row,
        "status": "FINISHED",
        "error": None,
        "mlflow_run_id": result.run_id,
        "cache_hit": result.cache_hit,
        "wall_s": time.perf_counter() - start,
        "figures": result.figures,
        "model": result.plan.model.name,
        "dtype": result.plan.dtype,
        "gpu": result.plan.env.get("gpu_name") if result.plan.device == "cuda" else "cpu",
        "versions": {k: result.plan.env.get(k) for k in ("torch", "transformers")},
    }


def decode_checks(args, batch: int, isl: int) -> dict[str, Any]:
    """The compiled engine once more (a cache hit): its tokens against hf's for the same prompts, then decode
    alone from the prompts' cache, and on a GPU its kernels."""
    untracked = ["tracker=none", "workload.iterations=1"]
    out: dict[str, Any] = {"batch": batch, "isl": isl}
    with open_engine(compose([*overrides(args, "compiled", batch, isl, 1), *untracked])) as engine:
        requests = engine.requests[:batch]
        rows = [g.token_ids for g in engine.generate(requests)]
        out["cache_hit"] = engine.cache_hit
        steps = min(32, args.osl)  # the cache holds isl + osl columns
        out["decode_only"] = engine.time_decode(batch, isl, steps, repeats=3)
        profile = engine.profile_decode(batch, isl, min(8, steps))
        if profile:
            profile.pop("table")
            out["profile"] = profile
    with open_engine(compose([*overrides(args, "hf", batch, isl, 1), *untracked])) as engine:
        out["token_match"] = token_match([g.token_ids for g in engine.generate(requests)], rows)
    return out


def card_tag(gpu: str | None) -> str:
    low = (gpu or "cpu").lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in low:
            return tag
    return "".join(c if c.isalnum() else "_" for c in low).strip("_")


def fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def table(results: dict[str, Any]) -> str:
    runs = [r for r in results["runs"] if r["status"] == "FINISHED"]
    hf = {(r["batch"], r["isl"]): r["figures"] for r in runs if r["backend"] == "hf"}
    lines = [
        f"{results.get('gpu')}; device bandwidth (1 GiB device copy, read + write) "
        f"{fmt(results.get('device_bandwidth_gb_s'), '.0f')} GB/s; {results.get('model')} ({results.get('dtype')}); "
        f"OSL {results.get('osl')}; compiled = engine.compile_mode={results.get('compile_mode')}, static batches.",
        "",
        "| backend | batch | ISL | P50 latency (ms) | P50 TTFT (ms) | P50 TPOT (ms) | tok/s | speedup vs hf "
        "| GPU util (%) | peak GPU mem (GB) | roofline eff. | engine build / load (s) | cache hit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(runs, key=lambda r: (r["batch"], r["isl"], r["backend"] != "hf")):
        f = r["figures"]
        base = hf.get((r["batch"], r["isl"]))
        speedup = f["output_throughput_tok_s"] / base["output_throughput_tok_s"] if base else None
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['isl']} | {fmt(f.get('e2e_latency_ms_p50'), '.0f')} "
            f"| {fmt(f.get('ttft_ms_p50'))} | {fmt(f.get('tpot_ms_p50'), '.2f')} "
            f"| {fmt(f.get('output_throughput_tok_s'), '.0f')} | {fmt(speedup, '.2f')}× "
            f"| {fmt(f.get('gpu_util_pct_mean'), '.0f')} | {fmt(f.get('gpu_peak_memory_gb'))} "
            f"| {pct(f.get('roofline_efficiency'))} | {fmt(f.get('phase_build_s'))} / {fmt(f.get('phase_load_s'))} "
            f"| {r['cache_hit']} |"
        )
    for r in results["runs"]:
        if r["status"] != "FINISHED":
            lines.append(f"\nFAILED: {r['backend']} batch {r['batch']} ISL {r['isl']}: {r['error']}")
    checks = results.get("decode_checks", [])
    if checks:
        lines += [
            "",
            "Decode alone (compiled, steps back to back; roofline floor = (weights + KV read per step) / device "
            "bandwidth), and greedy tokens against hf's for the same prompts:",
            "",
            "| batch | context | step (ms) | decode tok/s | floor (ms) | of floor | kernel busy (%) "
            "| gap per step (µs) | kernels per step | exact sequences | tokens before first difference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in checks:
            if "error" in c:
                lines.append(f"| {c['batch']} | FAILED: {c['error']} |")
                continue
            d, prof, m = c["decode_only"], c.get("profile", {}), c["token_match"]
            idle_ms = prof.get("idle_ms_per_step")
            lines.append(
                f"| {c['batch']} | {d['context']} | {fmt(d['decode_step_ms'], '.2f')} "
                f"| {fmt(d['decode_tok_s'], '.0f')} "
                f"| {fmt(d.get('decode_floor_ms'), '.2f')} | {pct(d.get('roofline_efficiency'))} "
                f"| {fmt(prof.get('kernel_busy_pct'), '.0f')} | {fmt(idle_ms and idle_ms * 1e3, '.0f')} "
                f"| {fmt(prof.get('kernels_per_step'), '.0f')} | {m['exact_sequence_pct']:.0f}% "
                f"| {m['prefix_match_pct']:.0f}% |"
            )
        for c in checks:
            if share := c.get("profile", {}).get("share_pct"):
                parts = ", ".join(f"{k} {v:.0f}%" for k, v in share.items())
                lines.append(f"\nBatch {c['batch']} decode kernel time: {parts}.")
    return "\n".join(lines + targets(results))


def targets(results: dict[str, Any]) -> list[str]:
    """The compiled engine's targets: decode at batch 1 >= 80% and at batch 8 >= 75% of the bandwidth floor, from
    the runs' P50 TPOT and from decode alone; batch 1 end to end >= 4x eager hf."""
    runs = {(r["backend"], r["batch"], r["isl"]): r["figures"] for r in results["runs"] if r["status"] == "FINISHED"}
    alone = {c["batch"]: c.get("decode_only", {}) for c in results.get("decode_checks", [])}
    lines = ["", "| target | measured | met |", "| --- | --- | --- |"]
    for batch, goal in ((1, 0.80), (8, 0.75)):
        effs = {
            isl: f["roofline_efficiency"]
            for (backend, b, isl), f in runs.items()
            if backend == "compiled" and b == batch and "roofline_efficiency" in f
        }
        if not effs:
            continue
        measured = ", ".join(f"ISL {isl}: {100 * e:.0f}%" for isl, e in sorted(effs.items()))
        alone_eff = alone.get(batch, {}).get("roofline_efficiency")
        if alone_eff is not None:
            measured += f"; decode alone: {100 * alone_eff:.0f}%"
        met = min(effs.values()) >= goal and (alone_eff is None or alone_eff >= goal)
        floor = f"decode at batch {batch} >= {100 * goal:.0f}% of the bandwidth floor"
        lines.append(f"| {floor} | {measured} | {'yes' if met else 'no'} |")
    speedups = {
        isl: f["output_throughput_tok_s"] / runs[("hf", 1, isl)]["output_throughput_tok_s"]
        for (backend, b, isl), f in runs.items()
        if backend == "compiled" and b == 1 and ("hf", 1, isl) in runs
    }
    if speedups:
        measured = ", ".join(f"ISL {isl}: {x:.2f}×" for isl, x in sorted(speedups.items()))
        met = "yes" if min(speedups.values()) >= 4 else "no"
        lines.append(f"| end to end at batch 1 >= 4× eager hf | {measured} | {met} |")
    return lines if len(lines) > 3 else []


def write_outputs(results: dict[str, Any], out: Path, work: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = card_tag(results.get("gpu"))
    (out / f"gpu_compare_{tag}.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    (out / f"gpu_compare_{tag}.md").write_text(table(results) + "\n")
    if work is not None and (work / "mlruns").is_dir():
        with tarfile.open(out / f"gpu_compare_{tag}_mlruns.tar.gz", "w:gz") as tar:
            tar.add(work / "mlruns", arcname="mlruns")


def merge(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"runs": [], "decode_checks": []}
    for path in paths:
        part = json.loads(path.read_text())
        merged["runs"] += part.get("runs", [])
        merged["decode_checks"] += part.get("decode_checks", [])
        merged.update({k: v for k, v in part.items() if k not in ("runs", "decode_checks")})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/gpu_compare"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--isl", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["hf", "compiled"])
    parser.add_argument("--requests", type=int, default=2, help="measured requests (batch 1) or waves (batch > 1)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--shape", default="qwen2.5-7b", choices=list(SHAPES), help="the model architecture: tiny for a rehearsal"
    )
    parser.add_argument("--no-checks", action="store_true", help="skip step 2 (tokens, decode alone, profile)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--report", type=Path, nargs="+", help="merge these results files; print the table only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.report:
        merged = merge(args.report)
        write_outputs(merged, args.out, None)
        print(table(merged))
        return

    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"  # what earlier calls on this machine measured, merged into this one
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": [], "decode_checks": []}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2, default=str))
        write_outputs(results, args.out, args.work)

    for batch in args.batches:
        for isl in args.isl:
            for backend in args.backends:
                key = (backend, batch, isl)
                if any(
                    (r["backend"], r["batch"], r["isl"], r["status"]) == (*key, "FINISHED") for r in results["runs"]
                ):
                    continue  # measured by an earlier call on this machine (same card, same checkpoint)
                log.info("=== %s batch %d ISL %d ===", backend, batch, isl)
                row = measure(args, backend, batch, isl)
                results["runs"] = [r for r in results["runs"] if (r["backend"], r["batch"], r["isl"]) != key] + [row]
                if row["status"] == "FINISHED":
                    results.update({k: row[k] for k in ("gpu", "model", "dtype", "osl", "versions")})
                    if "device_bandwidth_gb_s" in row["figures"]:
                        results["device_bandwidth_gb_s"] = row["figures"]["device_bandwidth_gb_s"]
                if backend == "compiled":
                    results["compile_mode"] = row["compile_mode"]
                save()
        done = any(c["batch"] == batch and "error" not in c for c in results["decode_checks"])
        if not args.no_checks and "compiled" in args.backends and not done:
            log.info("=== decode checks, batch %d ===", batch)
            try:
                check = decode_checks(args, batch, args.isl[0])
            except Exception as exc:
                log.exception("decode checks failed")
                check = {"batch": batch, "isl": args.isl[0], "error": f"{type(exc).__name__}: {exc}"}
            results["decode_checks"] = [c for c in results["decode_checks"] if c["batch"] != batch] + [check]
            save()
    print(table(results))


if __name__ == "__main__":
    main()
