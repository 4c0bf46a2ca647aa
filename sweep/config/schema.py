"""Config schema: the dataclasses Hydra validates every composed config against, and the allowed values.

The bottom layer: it imports nothing from sweep. Type errors and unknown keys are caught by OmegaConf while Hydra
composes (it names the key and the value); ranges and choices are checked by sweep/job/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
PLUGIN_DTYPES = ("auto", "disable", "float16", "bfloat16", "float32")
SCENARIOS = ("latency", "throughput", "concurrency", "rate")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
LENGTH_DISTRIBUTIONS = ("fixed", "normal")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("maximize", "minimize")
GENERATORS = ("random",)  # model.generate
# engine.quantization: the linear layers' weights (and, for fp8, their input activations) as the engine holds them.
QUANTIZATIONS = ("none", "int8_weight_only", "int4_weight_only", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")  # engine.kv_cache_dtype: auto is the run's dtype


@dataclass
class ModelConfig:
    name: str = MISSING  # a generated model is recorded under its shape's name instead (random-<shape>, or tiny)
    # The source, first set wins: a local checkpoint dir, a hub id (at `revision`), or `generate: random`: random
    # weights of the architecture `shape` names (one of sweep.model.SHAPES), drawn from `seed`, written once in the
    # run's dtype under cache_dir/checkpoints/.
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    generate: Optional[str] = None
    shape: Optional[str] = None
    seed: int = 0
    dtype: str = "bfloat16"  # the checkpoint's native dtype; engine.dtype=auto uses it on a GPU


@dataclass
class EngineConfig:
    """Build options shared by backends. Each backend honours a subset; the rest are recorded as ignored."""

    dtype: str = "auto"
    max_batch_size: int = 1
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 8192
    attn_implementation: str = "sdpa"
    gemm_plugin: str = "auto"
    gpt_attention_plugin: str = "auto"
    context_fmha: bool = True
    paged_kv_cache: bool = True
    tokens_per_block: int = 32
    compile_mode: str = "reduce-overhead"
    cuda_graphs: bool = True
    # Decode batch sizes captured in CUDA graphs by in-flight engines; None: powers of two up to max_batch_size.
    # max_batch_size itself is always captured.
    cuda_graph_batch_sizes: Optional[List[int]] = None
    # QUANTIZATIONS: none, int8_weight_only, int4_weight_only, fp8 (weights and activations). Backends map it to
    # their own API and refuse what they or the device cannot run.
    quantization: str = "none"
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: auto (the run's dtype) or fp8, where a backend has it
    # The engine's ranks: its weights split over tp_size GPUs (tensor parallel) and its layers over pp_size stages
    # (pipeline parallel), tp_size x pp_size GPUs in all (processes on the CPU). A backend that cannot split a model
    # refuses values above 1 (docs/backends.md).
    tp_size: int = 1
    pp_size: int = 1


@dataclass
class BackendConfig:
    """Runtime settings of one backend (not part of the engine). Backends subclass it with their own fields."""

    name: str = MISSING


@dataclass
class WorkloadConfig:
    scenario: str = "latency"
    num_requests: int = 4
    warmup_requests: int = 1
    iterations: int = 3
    input_len: int = 32
    output_len: int = 32
    length_distribution: str = "fixed"
    input_len_std: float = 0.0
    output_len_std: float = 0.0
    dataset: Optional[str] = None  # JSONL in trtllm-bench's format: task_id, prompt or input_ids, output_tokens
    batch_size: Optional[int] = None  # requests in flight in throughput mode; None = engine.max_batch_size
    concurrency: int = 1  # scenario=concurrency: clients in a closed loop
    request_rate: float = float("inf")  # scenario=rate: offered requests per second (inf: all at t0)
    burstiness: float = 1.0  # scenario=rate: shape of the gamma-distributed gaps (1 = Poisson)
    seed: int = 0


@dataclass
class SloConfig:
    """Service-level objectives; a request is good when it meets every one that is set (vLLM's goodput)."""

    name: str = "none"
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    e2e_ms: Optional[float] = None


@dataclass
class QualityConfig:
    """The quality figure of every run: the engine teacher-forced against the same model unquantized (transformers,
    the run's dtype) on the workload's first `prompts` prompts plus the reference's greedy continuation."""

    enabled: bool = True
    prompts: int = 4  # the workload's first K measured prompts (fewer when it has fewer)
    tokens: int = 32  # greedy continuation scored per prompt (at most the request's output_len)


@dataclass
class TrackerConfig:
    name: str = "mlflow"
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db
    experiment: str = "sweep"
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)  # extra run tags, e.g. a sweeper's trial number


@dataclass
class ObjectiveConfig:
    metric: str = "output_throughput_tok_s"
    direction: str = "maximize"


@dataclass
class SweepConfig:
    model: ModelConfig = MISSING
    backend: Any = MISSING  # a BackendConfig subclass, chosen by the backend group
    engine: EngineConfig = field(default_factory=EngineConfig)
    workload: WorkloadConfig = MISSING
    slo: SloConfig = field(default_factory=SloConfig)
    tracker: TrackerConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    device: str = "auto"
    cache_dir: str = "engines_cache"
    reuse_open_engine: bool = True
