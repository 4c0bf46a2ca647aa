"""Config schema: the dataclasses Hydra validates every composed config against.

Type errors and unknown keys are caught by OmegaConf while Hydra composes (it names the key and the value).
Value ranges and choices are checked by `validate`, before anything is loaded, built or recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value sweep cannot run with. The message names the key, the value and what is allowed."""


DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
PLUGIN_DTYPES = ("auto", "disable", "float16", "bfloat16", "float32")
SCENARIOS = ("latency", "throughput")
LENGTH_DISTRIBUTIONS = ("fixed", "normal")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class ModelConfig:
    name: str = MISSING
    # The source, first set wins: a local checkpoint dir, a hub id (at `revision`), or `generate: tiny`.
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    generate: Optional[str] = None
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
    seed: int = 0


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
    tracker: TrackerConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    device: str = "auto"
    cache_dir: str = "engines_cache"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConfig)  # types model, engine, workload, tracker and objective
    # The backend node's type depends on the backend chosen: each backend YAML pulls in its own schema.
    from sweep.backends import BACKENDS

    for name, backend_cls in BACKENDS.items():
        cs.store(group="backend", name=f"{name}_schema", node=backend_cls.config_class)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _at_least(key: str, value: Any, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be >= {minimum}")


def validate(cfg: Any) -> None:
    """Check value ranges and choices that the types alone do not express."""
    from sweep.backends import BACKENDS
    from sweep.metrics import objective_candidates

    m, e, w = cfg.model, cfg.engine, cfg.workload
    if not (m.path or m.hub_id or m.generate):
        raise ConfigError(f"model={m.name!r} has no source; set model.path, model.hub_id or model.generate")
    if m.generate and not (m.path or m.hub_id):
        _choice("model.generate", m.generate, ("tiny",))
    _choice("model.dtype", m.dtype, DTYPES[1:])
    _choice("backend.name", cfg.backend.name, tuple(BACKENDS))
    _choice("device", cfg.device, DEVICES)
    _choice("engine.dtype", e.dtype, DTYPES)
    _choice("engine.attn_implementation", e.attn_implementation, ATTN_IMPLEMENTATIONS)
    _choice("engine.compile_mode", e.compile_mode, COMPILE_MODES)
    _choice("engine.gemm_plugin", e.gemm_plugin, PLUGIN_DTYPES)
    _choice("engine.gpt_attention_plugin", e.gpt_attention_plugin, PLUGIN_DTYPES)
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
        _at_least(f"engine.{key}", e[key], 1)
    _choice("workload.scenario", w.scenario, SCENARIOS)
    _choice("workload.length_distribution", w.length_distribution, LENGTH_DISTRIBUTIONS)
    for key in ("num_requests", "iterations", "input_len", "output_len"):
        _at_least(f"workload.{key}", w[key], 1)
    for key in ("warmup_requests", "input_len_std", "output_len_std"):
        _at_least(f"workload.{key}", w[key], 0)
    if w.batch_size is not None:
        _at_least("workload.batch_size", w.batch_size, 1)
        if w.batch_size > e.max_batch_size:
            raise ConfigError(
                f"workload.batch_size={w.batch_size} is not allowed; it must be <= engine.max_batch_size={e.max_batch_size}"
            )
    _choice("objective.metric", cfg.objective.metric, tuple(objective_candidates()))
    _choice("objective.direction", cfg.objective.direction, DIRECTIONS)
    _choice("tracker.name", cfg.tracker.name, ("mlflow", "none"))
