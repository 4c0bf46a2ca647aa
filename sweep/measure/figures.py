"""The one registry of figures: name, label, unit, which way is better, and what it means.

The run summary, the report, `objective.metric` validation, the sweeper's objectives and constraints, and
`--help` all read it. docs/figures.md is generated from it.
A distribution figure (per request) is recorded as `<name>_<stat>` for every stat in STATS, plus `<name>_n`.
"""

from __future__ import annotations

from dataclasses import dataclass

STATS = ("p50", "p90", "p95", "p99", "mean", "stdev", "min", "max")


@dataclass(frozen=True)
class Figure:
    name: str
    label: str
    unit: str
    better: str  # "higher", "lower", or "" for a fact that is neither (model bytes, sample counts)
    meaning: str
    distribution: bool = False  # per request: recorded as <name>_<stat>
    spread: bool = False  # per iteration: the median, with <name>_min and <name>_max


FIGURES: tuple[Figure, ...] = (
    # per request
    Figure("ttft_ms", "TTFT", "ms", "lower", "first output token on the host - arrival", distribution=True),
    Figure(
        "tpot_ms", "TPOT", "ms", "lower", "(E2E - TTFT) / (OSL - 1); requests with OSL 1 left out", distribution=True
    ),
    Figure(
        "itl_ms",
        "ITL",
        "ms",
        "lower",
        "every gap between consecutive streamed chunks (tokens when one per chunk), pooled",
        distribution=True,
    ),
    Figure(
        "tokens_per_chunk",
        "tokens/chunk",
        "tok",
        "",
        "output tokens that reached the host together in one response",
        distribution=True,
    ),
    Figure(
        "e2e_latency_ms", "E2E latency", "ms", "lower", "last output token on the host - arrival", distribution=True
    ),
    Figure("queue_ms", "queue time", "ms", "lower", "admitted (prefill starts) - arrival", distribution=True),
    # per run
    Figure(
        "output_throughput_tok_s",
        "output throughput",
        "tok/s",
        "higher",
        "output tokens / (last token - first arrival), median over iterations",
        spread=True,
    ),
    Figure(
        "output_throughput_tok_s_per_gpu",
        "output throughput per GPU",
        "tok/s",
        "higher",
        "output throughput / (engine.tp_size x engine.pp_size): the engine's GPUs; recorded on a GPU only",
    ),
    Figure(
        "total_token_throughput_tok_s",
        "total token throughput",
        "tok/s",
        "higher",
        "(input + output tokens) / the same duration",
        spread=True,
    ),
    Figure(
        "request_throughput_req_s",
        "request throughput",
        "req/s",
        "higher",
        "completed requests / the same duration",
        spread=True,
    ),
    Figure("goodput_req_s", "goodput", "req/s", "higher", "requests meeting every SLO set / duration (slo.*)"),
    Figure("goodput_tok_s", "goodput tokens", "tok/s", "higher", "output tokens of good requests / duration"),
    Figure("slo_attainment_pct", "SLO attainment", "%", "higher", "good requests / all requests"),
    Figure("offered_rate_req_s", "offered rate", "req/s", "", "rate scenario: (n - 1) / arrival window"),
    Figure(
        "achieved_rate_req_s",
        "achieved rate",
        "req/s",
        "higher",
        "rate scenario: (n - 1) / admission window; below 95% of offered = saturated",
    ),
    Figure(
        "max_sustainable_rate_req_s",
        "max sustainable rate",
        "req/s",
        "higher",
        "max-rate search: highest offered rate whose SLO attainment met the target",
    ),
    Figure("build_time_s", "build time", "s", "lower", "engine build or compile; 0 on a cache hit"),
    Figure("compile_and_warmup_s", "compile + warm-up", "s", "lower", "compiling the engine's steps at load"),
    Figure("model_load_s", "model load", "s", "lower", "reading the weights onto the device"),
    Figure(
        "graphs_compiled_while_timed",
        "graphs compiled while timed",
        "",
        "lower",
        "graphs torch.compile compiled during the timed iterations (engines that compile in the run's process); above "
        "0, a timed request waited for a compile",
    ),
    Figure("gpu_util_pct_mean", "GPU utilisation (mean)", "%", "higher", "NVML utilization.gpu every 100 ms"),
    Figure("gpu_util_pct_max", "GPU utilisation (max)", "%", "higher", "NVML utilization.gpu every 100 ms"),
    Figure(
        "gpu_peak_memory_gb",
        "peak GPU memory (NVML)",
        "GB",
        "lower",
        "device memory of this process and its workers (else device used - idle), max over the window",
    ),
    Figure("gpu_sm_clock_mhz_mean", "SM clock (mean)", "MHz", "", "NVML SM clock over the window"),
    Figure("gpu_power_w_mean", "GPU power (mean)", "W", "lower", "NVML power over the window"),
    Figure("gpu_samples", "NVML samples", "", "", "samples taken over the window"),
    Figure("energy_j", "energy", "J", "lower", "NVML total energy counter, end - start of the window"),
    Figure("tokens_per_j", "tokens per joule", "tok/J", "higher", "output tokens / energy"),
    Figure("torch_max_allocated_gb", "torch max allocated", "GB", "lower", "torch.cuda.max_memory_allocated"),
    Figure("torch_max_reserved_gb", "torch max reserved", "GB", "lower", "torch.cuda.max_memory_reserved"),
    Figure("host_peak_rss_gb", "host peak RSS", "GB", "lower", "peak resident memory of the process"),
    Figure("roofline_efficiency", "roofline efficiency", "", "higher", "decode floor per step / TPOT P50"),
    Figure(
        "roofline_efficiency_all_weights",
        "roofline efficiency (all weights)",
        "",
        "higher",
        "(every weight + KV bytes) / (tp_size x bandwidth) / TPOT P50: gpt-fast's count, the input embedding table "
        "included",
    ),
    Figure(
        "decode_bytes_per_step",
        "bytes read per decode step",
        "B",
        "",
        "weights - input embedding table + one table row and the KV cache at the mean context, per sequence",
    ),
    Figure(
        "decode_floor_ms",
        "decode floor per step",
        "ms",
        "",
        "bytes read per decode step / (engine.tp_size x device bandwidth): tensor-parallel GPUs read their shards at "
        "once; pipeline stages read theirs one after another, so pp_size adds no bandwidth to one step",
    ),
    Figure("roofline_floor_tok_s", "roofline throughput", "tok/s", "", "batch / decode floor"),
    Figure(
        "device_bandwidth_gb_s",
        "device bandwidth",
        "GB/s",
        "",
        "one board's: 1 and 4 GiB device copies (read + write) on an idle device, best median; cached per board",
    ),
    Figure("device_bandwidth_spread_pct", "device bandwidth spread", "%", "", "(max - min) / median of its repeats"),
    Figure("model_params", "parameters", "", "", "parameters in the checkpoint"),
    Figure(
        "model_bytes",
        "model bytes",
        "B",
        "",
        "the weights as the engine holds them: the decoder's linear weights as engine.quantization packs them "
        "(scales included), the rest in the run's dtype",
    ),
    Figure(
        "kv_bytes_per_token",
        "KV bytes per token",
        "B",
        "",
        "2 x layers x KV heads x head dim x bytes (1 with engine.kv_cache_dtype=fp8)",
    ),
    Figure(
        "input_embedding_bytes",
        "input embedding table",
        "B",
        "",
        "vocab x hidden x bytes, left out of the decode floor; 0 when tied (the LM head reads it whole)",
    ),
    Figure(
        "quality_top1_agreement_pct",
        "top-1 agreement",
        "%",
        "higher",
        "teacher-forced on quality.prompts prompts + the reference's greedy continuation: the engine's most likely "
        "next token is the unquantized model's (transformers, the run's dtype)",
    ),
    Figure(
        "quality_kl",
        "KL divergence",
        "nats",
        "lower",
        "mean KL(reference || engine) of the next-token distributions per position, full logits",
    ),
    Figure(
        "quality_kl_topk",
        "KL divergence (top k)",
        "nats",
        "lower",
        "the same over the engine's top k tokens, both renormalised over them: engines that return only top-k "
        "log-probabilities (vllm: its prompt logprobs)",
    ),
    Figure("quality_positions", "quality positions", "", "", "next-token positions the quality figures average"),
    Figure("iterations", "iterations", "", "", "measured passes over the workload"),
    Figure("output_tokens", "output tokens", "tok", "", "output tokens over all measured iterations"),
    Figure("engine_cache_hit", "engine cache hit", "", "", "1 when the engine came from the cache"),
    Figure("phase_prepare_s", "prepare", "s", "lower", "config checks, model and workload"),
    Figure("phase_build_s", "build or reuse", "s", "lower", "engine cache look-up and build"),
    Figure("phase_load_s", "load", "s", "lower", "making the engine ready"),
    Figure("phase_benchmark_s", "benchmark", "s", "lower", "warm-up and measured iterations"),
    Figure("phase_quality_s", "quality check", "s", "lower", "the reference (unless cached) and the engine's scores"),
    Figure("phase_record_s", "record", "s", "lower", "artifacts into the tracker"),
)

BY_NAME = {f.name: f for f in FIGURES}

# The seed's comparison table, with peak GPU memory: the report's table and the MLflow UI's default columns.
HEADLINE = (
    "e2e_latency_ms_p50",
    "e2e_latency_ms_p99",
    "ttft_ms_p50",
    "tpot_ms_p50",
    "output_throughput_tok_s",
    "gpu_peak_memory_gb",
)


def metric_names() -> dict[str, Figure]:
    """Every metric name a run can record, with the figure it belongs to."""
    names: dict[str, Figure] = {}
    for f in FIGURES:
        if f.distribution:
            names.update({f"{f.name}_{stat}": f for stat in (*STATS, "n")})
        else:
            names[f.name] = f
            if f.spread:
                names.update({f"{f.name}_min": f, f"{f.name}_max": f})
    return names


def objective_names() -> list[str]:
    """The metrics a sweep may optimise or constrain: every one that has a better direction."""
    return [name for name, f in metric_names().items() if f.better and not name.endswith("_n")]


def lookup(metric: str) -> Figure:
    """The figure of a recorded metric name (`ttft_ms_p99` -> TTFT)."""
    return metric_names()[metric]


def label(metric: str, with_unit: bool = True) -> str:
    """`ttft_ms_p99` -> 'TTFT P99 (ms)'; a metric outside the registry keeps its name."""
    f = metric_names().get(metric)
    if f is None:
        return metric
    text = f.label
    if metric != f.name:
        text += " " + metric.removeprefix(f.name + "_").upper()
    return f"{text} ({f.unit})" if with_unit and f.unit else text


def unknown_figure_message(key: str, value: str) -> str:
    """One line for a name that is no figure with a direction: the closest names, and where the list is."""
    import difflib

    close = difflib.get_close_matches(value, objective_names(), n=3, cutoff=0.5)
    examples = close or ["output_throughput_tok_s", "ttft_ms_p99", "tpot_ms_p50", "gpu_peak_memory_gb"]
    return (
        f"{key}={value!r} is not allowed; choose a figure sweep records, "
        f"{'did you mean' if close else 'e.g.'} {', '.join(examples)} (`python -m sweep --help` lists them all)"
    )
