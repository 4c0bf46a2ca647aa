"""hf (eager) against compiled, on Qwen2.5-7B's architecture with random fp16 weights, through `python -m sweep`'s code.

    python benchmarks/gpu_compare.py --work build/gpu_compare --out results/ [--batches 1 8] [--isl 128 512]

Steps, each printed and saved as it finishes (a run cut short keeps what it did):
1. write the checkpoint once (config + safetensors + a byte-level tokenizer): speed does not depend on weight
   values when EOS is ignored (../shared/gpu.md);
2. for each batch size and input length, hf then compiled: compose the config with Hydra's compose API and call
   sweep.run, the function `python -m sweep` runs, recording into an MLflow store under --work; batch 1
   is the latency scenario, batch 8 the throughput scenario; one engine per batch size (max_seq_len holds the
   longest workload), so the second input length is an engine-cache hit;
3. per batch size, the compiled engine once more (a cache hit): decode alone timed with CUDA events and
   profiled (kernel time against gaps, share of each kind of kernel), and its fp16 tokens against hf's;
4. the table (P50 latency, TTFT, tok/s, GPU utilisation, peak memory, speedup vs hf, roofline efficiency,
   device bandwidth) and results JSON into --out, with the MLflow store as mlruns.tar.gz.

`--report A.json [B.json ...]` merges result files written by earlier calls and prints/writes the table only.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_compare")

# Qwen2.5-7B-Instruct's architecture (../shared/gpu.md): 7.62e9 parameters, 15.23 GB in fp16.
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# A small stand-in with the same structure, to rehearse this script on a CPU.
SMALL = dict(
    QWEN25_7B,
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
OSL = 128


# -- 1. the checkpoint --------------------------------------------------------------------------------------------
def make_checkpoint(path: Path, shape: dict, device: str, architecture: str = "qwen2", dtype: str = "float16") -> Path:
    """A checkpoint of this shape with random weights (config + safetensors + a byte-level tokenizer), written once:
    speed does not depend on weight values when EOS is ignored. architecture: qwen2 or llama."""
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers

    from sweep.model.source import build_byte_tokenizer

    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[architecture]
    start = time.perf_counter()
    tokenizer = build_byte_tokenizer()
    config = config_class(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
    )
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a second on a GPU instead of minutes of CPU init
        model = model_class(config).to(getattr(torch, dtype))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    del model
    free_device_memory()  # else the first run's peak GPU memory counts these 15 GB, still in torch's cache
    log.info("wrote %s in %.0f s", path, time.perf_counter() - start)
    return path


# -- 2. the sweep runs ----------------------------------------------------------------------------------------
def compose(
    checkpoint: Path,
    work: Path,
    device: str,
    backend: str,
    batch: int,
    isl: int,
    requests: int,
    iterations: int,
    extra: list[str],
):
    from sweep.job.compose import compose as compose_config

    workload = (
        ["workload=latency", f"workload.num_requests={requests}", "workload.warmup_requests=1"]
        if batch == 1
        else [
            "workload=throughput",
            f"workload.num_requests={requests * batch}",
            f"workload.warmup_requests={batch}",
            f"workload.batch_size={batch}",
        ]
    )
    overrides = [
        "model=qwen2.5-7b",
        f"model.path={checkpoint}",
        "model.dtype=float16",
        f"backend={backend}",
        # The table's compiled engine runs static waves; profile_decode drives that engine's buffers.
        *(["backend.scheduler=static"] if backend == "compiled" else []),
        f"device={device}",
        "engine.dtype=float16" if device == "cuda" else "engine.dtype=float32",
        f"engine.max_batch_size={batch}",
        f"engine.max_seq_len={512 + OSL}",
        "engine.max_input_len=512",
        *workload,
        f"workload.input_len={isl}",
        f"workload.output_len={OSL}",
        f"workload.iterations={iterations}",
        f"cache_dir={work / 'engines_cache'}",
        "tracker=mlflow",
        f"tracker.uri=sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "tracker.experiment=gpu_compare",
        f"tracker.run_name={backend}-b{batch}-isl{isl}",
        *extra,
    ]
    return compose_config(overrides)


def latest_run(work: Path, name: str, since: float) -> Any:
    """This configuration's MLflow run, if it got as far as starting one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpu_compare")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)
    if runs and runs[0].info.run_name == name and runs[0].info.start_time >= since * 1000:
        return runs[0]
    return None


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next run's peak memory is its own, not what this one left in torch's pool


def sweep_run(cfg, work: Path) -> dict[str, Any]:
    from sweep import run

    start, started_at = time.perf_counter(), time.time()
    try:
        run(cfg)
        error = None
    except BaseException as exc:  # one failed variant must not cost the others; the error goes into the results
        log.exception("run failed")
        error = f"{type(exc).__name__}: {exc}"
    free_device_memory()
    run = latest_run(work, cfg.tracker.run_name, started_at - 1)
    return {
        "backend": cfg.backend.name,
        "batch": cfg.engine.max_batch_size,
        "isl": cfg.workload.input_len,
        "osl": OSL,
        "compile_mode": cfg.engine.compile_mode if cfg.backend.name == "compiled" else None,
        "mlflow_run_id": run and run.info.run_id,
        "status": run.info.status if run else "NOT STARTED",
        "error": error,
        "cache_hit": run and run.data.tags.get("engine.cache_hit"),
        "wall_s": time.perf_counter() - start,
        "figures": dict(run.data.metrics) if run else {},
        "gpu": run.data.tags.get("gpu") if run else None,
    }


# -- 3. decode alone: timing, profile, tokens against hf ------------------------------------------------------
def start_backend(cfg):
    """Build-or-reuse and load a backend exactly as sweep.run does, without benchmarking it."""
    from sweep.job.plan import make_plan, start_engine

    p = make_plan(cfg)
    return p, start_engine(p).entry


KERNEL_KINDS = (  # by kernel name; first match wins (cuDNN's SDPA kernels have sm90 in their names too)
    ("attention", ("sdpa", "fmha", "flash", "attention", "efficient")),
    ("gemm/gemv", ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet", "sm90", "splitk")),
    ("fused triton (norms, rope, mask, argmax, adds)", ("triton",)),
    ("copies/fills", ("copy", "fill", "memcpy", "memset", "index")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_decode(p, batch: int, isl: int, steps: int = 32) -> dict[str, Any]:
    """Decode steps back to back (no host sync per token): GPU time per step, and where it goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    backend, state = p.backend, p.backend.state
    with torch.inference_mode():
        ids = torch.randint(0, p.model.shape.vocab_size - 4, (state.batch, isl), device=state.device)
        state.pad_len.zero_()
        first = backend.run_prefill(ids)
        state.token.copy_(first[:, None])
        state.input_pos.fill_(isl)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            backend.run_decode()
        end.record()
        end.synchronize()
        step_ms = begin.elapsed_time(end) / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(8):
                backend.run_decode()
            torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    result: dict[str, Any] = {"decode_step_ms": step_ms, "context": isl + steps // 2, "profiled_steps": 8}
    if kernels:
        busy, cursor = 0.0, kernels[0][0]
        by_kind: dict[str, float] = {}
        for s, e, name in kernels:
            busy += max(0.0, e - max(s, cursor))
            cursor = max(cursor, e)
            by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + (e - s)
        window = kernels[-1][1] - kernels[0][0]
        total = sum(by_kind.values())
        result.update(
            kernels_per_step=len(kernels) / 8,
            kernel_busy_pct=100 * busy / window,
            gap_us_per_step=(window - busy) / 8,
            share_pct={k: 100 * v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            top_kernels=top_kernels(kernels),
        )
    return result


def top_kernels(kernels: list, n: int = 8) -> list[dict[str, Any]]:
    per_name: dict[str, list[float]] = {}
    for s, e, name in kernels:
        per_name.setdefault(name, []).append(e - s)
    total = sum(e - s for s, e, _ in kernels)
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [
        {
            "kernel": name[:90],
            "calls_per_step": len(d) / 8,
            "us_per_step": sum(d) / 8,
            "share_pct": 100 * sum(d) / total,
        }
        for name, d in ranked
    ]


def decode_roofline(p, batch: int, context: float, step_ms: float) -> dict[str, float]:
    from sweep.measure.metrics import roofline_figures
    from sweep.measure.telemetry import device_bandwidth

    bandwidth = device_bandwidth(p.cache.root, p.env)["bytes_per_s"]
    fig = roofline_figures(p.sizes, p.model.shape.vocab_size, batch, context, bandwidth, step_ms / 1e3)
    return {**fig, "decode_tok_s": batch / (step_ms / 1e3), "device_bandwidth_gb_s": bandwidth / 1e9}


def token_match(hf_rows: list[list[int]], rows: list[list[int]]) -> dict[str, float]:
    """Exact sequences, tokens before the first difference, and equal tokens position by position."""
    exact = sum(a == b for a, b in zip(hf_rows, rows))
    prefix, equal, total = 0, 0, 0
    for a, b in zip(hf_rows, rows):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return {
        "sequences": len(hf_rows),
        "exact_sequence_pct": 100 * exact / len(hf_rows),
        "prefix_match_pct": 100 * prefix / total,
        "position_match_pct": 100 * equal / total,
    }


def decode_checks(args, checkpoint: Path, work: Path, batch: int, isl: int) -> dict[str, Any]:
    """The compiled engine once more (a cache hit): decode alone, its profile, and its tokens against hf's."""
    cfg = compose(checkpoint, work, args.device, "compiled", batch, isl, 1, 1, args.extra)
    p, entry = start_backend(cfg)
    out: dict[str, Any] = {"batch": batch, "isl": isl, "cache_hit": entry.hit}
    try:
        requests = p.workload.measured[:batch]
        rows = [g.token_ids for g in p.backend.generate(requests)]
        if args.device == "cuda":
            prof = profile_decode(p, batch, isl)
            out["profile"] = prof
            out["decode_only"] = decode_roofline(p, batch, prof["context"], prof["decode_step_ms"])
    finally:
        p.backend.close()
        free_device_memory()
    hf_cfg = compose(checkpoint, work, args.device, "hf", batch, isl, 1, 1, args.extra)
    hp, _ = start_backend(hf_cfg)
    try:
        hf_rows = [g.token_ids for g in hp.backend.generate(requests)]
    finally:
        hp.backend.close()
        free_device_memory()
    out["fp16_token_match"] = token_match(hf_rows, rows)
    return out


# -- 4. the table -----------------------------------------------------------------------------------------------
def card_tag(gpu: str | None) -> str:
    low = (gpu or "cpu").lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in low:
            return tag
    return "".join(c if c.isalnum() else "_" for c in low).strip("_")


def fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    runs = [r for r in results["runs"] if r["status"] == "FINISHED"]
    hf = {(r["batch"], r["isl"]): r["figures"] for r in runs if r["backend"] == "hf"}
    lines = [
        f"GPU: {results.get('gpu')}; device bandwidth (1 GiB device copy, read + write) "
        f"{fmt(results.get('device_bandwidth_gb_s'), '.0f')} GB/s; Qwen2.5-7B architecture, random weights, fp16, "
        f"OSL {OSL}; compiled = engine.compile_mode={results.get('compile_mode', 'reduce-overhead')}, CUDA graphs.",
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
            f"| {fmt(100 * f['roofline_efficiency'] if 'roofline_efficiency' in f else None, '.0f')}% "
            f"| {fmt(f.get('phase_build_s'))} / {fmt(f.get('phase_load_s'))} | {r['cache_hit']} |"
        )
    failed = [r for r in results["runs"] if r["status"] != "FINISHED"]
    for r in failed:
        lines.append(f"\nFAILED: {r['backend']} batch {r['batch']} ISL {r['isl']}: {r['error']}")
    checks = results.get("decode_checks", [])
    if checks:
        lines += [
            "",
            "Decode alone (compiled, steps back to back, CUDA events; roofline floor = (weights + KV read per step) "
            "/ device bandwidth), and fp16 greedy tokens against hf's for the same prompts:",
            "",
            "| batch | context | step (ms) | decode tok/s | floor (ms) | of floor | kernel busy | gap per step (µs) "
            "| kernels per step | exact sequences | tokens before first difference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in checks:
            d, prof, m = c.get("decode_only", {}), c.get("profile", {}), c.get("fp16_token_match", {})
            lines.append(
                f"| {c['batch']} | {prof.get('context', '–')} | {fmt(prof.get('decode_step_ms'), '.2f')} "
                f"| {fmt(d.get('decode_tok_s'), '.0f')} | {fmt(d.get('decode_floor_ms'), '.2f')} "
                f"| {fmt(100 * d['roofline_efficiency'] if d else None, '.0f')}% "
                f"| {fmt(prof.get('kernel_busy_pct'), '.0f')}% | {fmt(prof.get('gap_us_per_step'), '.0f')} "
                f"| {fmt(prof.get('kernels_per_step'), '.0f')} | {fmt(m.get('exact_sequence_pct'), '.0f')}% "
                f"| {fmt(m.get('prefix_match_pct'), '.0f')}% |"
            )
        for c in checks:
            share = c.get("profile", {}).get("share_pct")
            if share:
                parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(share.items(), key=lambda kv: -kv[1]))
                lines.append(f"\nBatch {c['batch']} decode kernel time: {parts}.")
    lines += targets(results)
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 4's targets: decode at batch 1 >= 80% and at batch 8 >= 75% of the bandwidth floor; batch 1 end to
    end >= 4x eager hf. Decode efficiency from the runs' P50 TPOT (what run.py records) and from decode alone."""
    runs = {(r["backend"], r["batch"], r["isl"]): r["figures"] for r in results["runs"] if r["status"] == "FINISHED"}
    checks = {c["batch"]: c.get("decode_only", {}) for c in results.get("decode_checks", [])}
    lines = ["", "| target (issue 4) | measured | met |", "| --- | --- | --- |"]
    for batch, goal in ((1, 0.80), (8, 0.75)):
        effs = {
            k[2]: f["roofline_efficiency"]
            for k, f in runs.items()
            if k[0] == "compiled" and k[1] == batch and "roofline_efficiency" in f
        }
        if not effs:
            continue
        alone = checks.get(batch, {}).get("roofline_efficiency")
        measured = ", ".join(f"ISL {isl}: {100 * e:.0f}%" for isl, e in sorted(effs.items()))
        if alone is not None:
            measured += f"; decode alone: {100 * alone:.0f}%"
        met = min(effs.values()) >= goal and (alone is None or alone >= goal)
        lines.append(
            f"| decode at batch {batch} >= {100 * goal:.0f}% of the bandwidth floor | {measured} "
            f"| {'yes' if met else 'no'} |"
        )
    speedups = {
        k[2]: f["output_throughput_tok_s"] / runs[("hf", 1, k[2])]["output_throughput_tok_s"]
        for k, f in runs.items()
        if k[0] == "compiled" and k[1] == 1 and ("hf", 1, k[2]) in runs
    }
    if speedups:
        measured = ", ".join(f"ISL {isl}: {x:.2f}×" for isl, x in sorted(speedups.items()))
        met = "yes" if min(speedups.values()) >= 4 else ("ISL 128 only" if speedups.get(128, 0) >= 4 else "no")
        lines.append(f"| end to end at batch 1 >= 4× eager hf | {measured} | {met} |")
    return lines


def write_outputs(results: dict[str, Any], out: Path, work: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = card_tag(results.get("gpu"))
    (out / f"gpu_compare_{tag}.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    (out / f"gpu_compare_{tag}.md").write_text(table(results) + "\n")
    if work is not None and (work / "mlruns").is_dir():
        with tarfile.open(out / "mlruns.tar.gz", "w:gz") as tar:
            tar.add(work / "mlruns", arcname="mlruns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "gpu_compare")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--isl", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--backends", nargs="+", default=["hf", "compiled"])
    parser.add_argument("--requests", type=int, default=2, help="measured requests (batch 1) or waves (batch > 1)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model of the same structure (rehearsal)")
    parser.add_argument("--no-checks", action="store_true", help="skip step 3 (decode alone, profile, tokens)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--report", type=Path, nargs="+", help="merge these results files; print the table only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.report:
        merged: dict[str, Any] = {"runs": [], "decode_checks": []}
        for path in args.report:
            part = json.loads(path.read_text())
            merged["runs"] += part.get("runs", [])
            merged["decode_checks"] += part.get("decode_checks", [])
            merged.update({k: v for k, v in part.items() if k not in ("runs", "decode_checks")})
        write_outputs(merged, args.out, None)
        print(table(merged))
        return

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(
        work / ("qwen2.5-7b-random-fp16" if not args.small else "small-random"),
        SMALL if args.small else QWEN25_7B,
        args.device,
    )
    results_file = work / "results.json"  # what earlier calls on this machine measured, merged into this one
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": [], "decode_checks": []}
    for batch in args.batches:
        for isl in args.isl:
            for backend in args.backends:
                if any(
                    (r["backend"], r["batch"], r["isl"], r["status"]) == (backend, batch, isl, "FINISHED")
                    for r in results["runs"]
                ):
                    continue  # measured by an earlier call on this machine (same card, same checkpoint)
                cfg = compose(
                    checkpoint, work, args.device, backend, batch, isl, args.requests, args.iterations, args.extra
                )
                log.info("=== %s batch %d ISL %d ===", backend, batch, isl)
                run = sweep_run(cfg, work)
                results["runs"] = [
                    r for r in results["runs"] if (r["backend"], r["batch"], r["isl"]) != (backend, batch, isl)
                ] + [run]
                results["gpu"] = run["gpu"] or results.get("gpu")
                results["device_bandwidth_gb_s"] = run["figures"].get(
                    "device_bandwidth_gb_s", results.get("device_bandwidth_gb_s")
                )
                results["compile_mode"] = cfg.engine.compile_mode
                results_file.write_text(json.dumps(results, indent=2, default=str))
                write_outputs(results, args.out, work)
        done = any(c["batch"] == batch and "error" not in c for c in results["decode_checks"])
        if not args.no_checks and "compiled" in args.backends and not done:
            log.info("=== decode checks, batch %d ===", batch)
            try:
                check = decode_checks(args, checkpoint, work, batch, args.isl[0])
            except Exception as exc:
                log.exception("decode checks failed")
                check = {"batch": batch, "isl": args.isl[0], "error": f"{type(exc).__name__}: {exc}"}
            results["decode_checks"] = [c for c in results["decode_checks"] if c["batch"] != batch] + [check]
            results_file.write_text(json.dumps(results, indent=2, default=str))
            write_outputs(results, args.out, work)
    import torch
    import transformers

    results.update(torch=torch.__version__, transformers=transformers.__version__)
    results_file.write_text(json.dumps(results, indent=2, default=str))
    write_outputs(results, args.out, work)
    print(table(results))


if __name__ == "__main__":
    main()
