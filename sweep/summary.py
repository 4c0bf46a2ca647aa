"""The readable table printed at the end of a run."""
from __future__ import annotations

LATENCY_ROWS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_latency_ms"))
SCALAR_ROWS = (
    ("output throughput", "output_throughput_tok_s", "tok/s"),
    ("total token throughput", "total_token_throughput_tok_s", "tok/s"),
    ("request throughput", "request_throughput_req_s", "req/s"),
    ("build time", "build_time_s", "s"),
    ("compile + warm-up", "compile_and_warmup_s", "s"),
    ("GPU utilisation (mean)", "gpu_util_pct_mean", "%"),
    ("peak GPU memory (NVML)", "gpu_peak_memory_gb", "GB"),
    ("torch max allocated", "torch_max_allocated_gb", "GB"),
    ("energy", "energy_j", "J"),
    ("tokens per joule", "tokens_per_j", "tok/J"),
    ("roofline efficiency", "roofline_efficiency", ""),
    ("host peak RSS", "host_peak_rss_gb", "GB"),
)


def summary_table(title: str, figures: dict[str, float]) -> str:
    lines = [title, f"{'latency (ms)':<16}{'p50':>10}{'p90':>10}{'p95':>10}{'p99':>10}{'mean':>10}{'n':>6}"]
    for label, key in LATENCY_ROWS:
        if figures.get(f"{key}_n"):
            stats = "".join(f"{figures[f'{key}_{s}']:>10.2f}" for s in ("p50", "p90", "p95", "p99", "mean"))
            lines.append(f"{label:<16}{stats}{int(figures[f'{key}_n']):>6}")
    for label, key, unit in SCALAR_ROWS:
        if key in figures:  # absent figures (GPU ones on a CPU) are left out, never shown as 0
            spread = ""
            if f"{key}_min" in figures:
                spread = f"   (min {figures[f'{key}_min']:.2f}, max {figures[f'{key}_max']:.2f})"
            lines.append(f"{label:<24}{figures[key]:>12.2f} {unit}{spread}")
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])
