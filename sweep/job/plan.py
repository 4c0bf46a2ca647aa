"""Planning a run: config -> model, workload, backend and cache key, with every check made before anything is built.

One planning step and one start-engine step, shared by the CLI (sweep/job/execute.py), the sweeper's feasibility check
(sweep/multirun/sweeper_api.py), the tests and the benchmarks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sweep.backends.base import KEYED_WHEN_SET, QUANTIZATION_DEFAULTS, Backend, engine_gpus
from sweep.backends.cache import CacheEntry, EngineCache, progress
from sweep.backends.registry import BACKENDS
from sweep.config.errors import ConfigError
from sweep.job.held_engine import HeldEngine
from sweep.job.validate import validate
from sweep.measure.telemetry import environment
from sweep.model.source import ModelSource, model_sizes, resolve_model
from sweep.workload.requests import Workload, make_workload
from sweep.workload.stream import arrival_schedule_s
from trackers.mlflow_tracker import check_reachable, default_uri
from trackers.store import StoreUnreachable

log = logging.getLogger(__name__)


@dataclass
class Plan:
    cfg: DictConfig
    device: str  # resolved: cpu or cuda
    dtype: str  # resolved: float32, float16 or bfloat16
    cache: EngineCache
    model: ModelSource
    workload: Workload
    batch_size: int  # requests in flight at once
    backend: Backend
    env: dict[str, Any]
    sizes: dict[str, int]  # model_params, model_bytes, kv_bytes_per_token, as the engine holds them (quantized)
    key_inputs: dict[str, Any]  # everything that shapes the built engine


@dataclass
class StartedEngine:
    entry: CacheEntry
    build_s: float  # cache look-up plus the build on a miss
    load_s: float
    reused: bool = False  # the engine the job before left open (sweep/job/held_engine.py): neither built nor loaded


def resolve_device(device: str) -> str:
    import torch  # here, not at the top: the CLI's --help and config errors load no torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; use device=auto or device=cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_gpu_count(engine: Any, device: str) -> None:
    """An engine split over tp_size x pp_size GPUs needs that many visible to this process (CUDA_VISIBLE_DEVICES)."""
    import torch

    gpus = engine_gpus(engine)
    if device != "cuda" or gpus == 1:
        return
    visible = torch.cuda.device_count()
    if gpus > visible:
        raise ConfigError(
            f"engine.tp_size={engine.tp_size} x engine.pp_size={engine.pp_size} needs {gpus} GPUs, and {visible} "
            f"{'is' if visible == 1 else 'are'} visible to this run; allowed: tp_size x pp_size <= {visible} "
            "(a sweep's trial gets hydra.sweeper.gpus_per_trial GPUs)"
        )


# Figures a run records only with at least one measured request of two or more output tokens, or only on a GPU.
NEEDS_TWO_OUTPUT_TOKENS = ("tpot_ms", "itl_ms", "roofline_efficiency")
NEEDS_GPU = (
    "gpu_",
    "energy_j",
    "tokens_per_j",
    "torch_max_",
    "roofline_",
    "decode_floor_ms",
    "device_bandwidth",
    "output_throughput_tok_s_per_gpu",
)


def check_objective_recordable(metric: str, workload: Workload, device: str) -> None:
    """The objective must be a figure this run will record, or the run would end without its value."""
    if metric.startswith(NEEDS_TWO_OUTPUT_TOKENS) and max(r.output_len for r in workload.measured) < 2:
        raise ConfigError(
            f"objective.metric={metric!r} needs a measured request with at least 2 output tokens (TPOT and ITL are "
            "gaps between output tokens), and every request of this workload has 1; raise workload.output_len"
        )
    if metric.startswith(NEEDS_GPU) and device != "cuda":
        raise ConfigError(f"objective.metric={metric!r} is recorded on a GPU only, and this run is on {device}")


LONG_SCHEDULE_S = 600  # an open loop whose arrivals alone take longer than this is probably not what was meant


def warn_long_schedule(wcfg: Any) -> None:
    """One warning for an arrival schedule that takes long (workload.request_rate=0.001 spreads 4 requests over
    ~50 minutes), with how to shorten it."""
    seconds = arrival_schedule_s(wcfg)
    if seconds > LONG_SCHEDULE_S:
        log.warning(
            "workload.request_rate=%s spreads the arrivals over ~%.0f minutes (%d requests x %d iterations, and the "
            "warm-up); raise workload.request_rate or lower workload.num_requests / workload.iterations to shorten it",
            wcfg.request_rate,
            seconds / 60,
            wcfg.num_requests,
            wcfg.iterations,
        )


def make_plan(cfg: DictConfig, open_backend: Backend | None = None) -> Plan:
    """Every check a run makes before it builds or records anything; a ConfigError says what to change.
    `open_backend`: an engine loaded for this config already (sweep/job/held_engine.py), checked, not made anew."""
    validate(cfg)
    if cfg.tracker.name == "mlflow":  # before anything is prepared: a dead server would only fail at the end
        try:
            check_reachable(cfg.tracker.uri or default_uri())
        except StoreUnreachable as exc:
            raise ConfigError(str(exc)) from None
    backend_cls = BACKENDS[cfg.backend.name].load()
    backend_cls.check_installed()  # before the model is fetched or generated
    device = resolve_device(cfg.device)
    check_gpu_count(cfg.engine, device)  # before the model is written or read on a device
    dtype = cfg.engine.dtype if cfg.engine.dtype != "auto" else (cfg.model.dtype if device == "cuda" else "float32")
    cache = EngineCache(Path(cfg.cache_dir).resolve())
    model = resolve_model(cfg.model, cache.root, dtype, device)
    # Here, not at the top: the CLI's --help and config errors load no torch or transformers (the quality module
    # imports torch).
    from transformers import AutoTokenizer

    from sweep.measure.quality import check_quality

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    workload = make_workload(cfg.workload, tokenizer, model.shape.vocab_size)
    check_objective_recordable(cfg.objective.metric, workload, device)
    warn_long_schedule(cfg.workload)
    w = cfg.workload
    batch_size = 1 if w.scenario == "latency" else (w.batch_size or cfg.engine.max_batch_size)
    backend = open_backend or backend_cls(cfg, model, device, dtype)
    backend.check(workload)
    check_quality(cfg, backend, workload, model.shape.vocab_size)
    env = environment(device)
    # What the engine holds: an option the backend ignores leaves its weights or KV cache as they are.
    held = {k: cfg.engine[k] if k in backend.honoured_options else v for k, v in QUANTIZATION_DEFAULTS.items()}
    sizes = model_sizes(model, dtype, held["quantization"], held["kv_cache_dtype"])
    if device == "cuda":
        memory = ("GPU", env["gpu_memory_total_gb"] * 1e9 if "gpu_memory_total_gb" in env else None)
    else:
        memory = ("host", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    backend.check_memory(sizes["model_bytes"], sizes["kv_bytes_per_token"], *memory)
    gpu = {k: env.get(k) for k in ("gpu_name", "gpu_compute_capability")} if device == "cuda" else "cpu"
    key_inputs = {
        "model": model.identity,
        "backend": backend.name,
        "libraries": backend.library_versions(),
        # quantization, kv_cache_dtype, tp_size and pp_size only when set: an unquantized engine on one device has
        # the key it has without them
        "options": {
            k: cfg.engine[k]
            for k in backend.artifact_options
            if not (k in KEYED_WHEN_SET and cfg.engine[k] == KEYED_WHEN_SET[k])
        },
        "dtype": dtype,
        "gpu": gpu,
    }
    if settings := backend.artifact_settings():  # only where there are any: other backends keep their keys
        key_inputs["settings"] = settings
    return Plan(cfg, device, dtype, cache, model, workload, batch_size, backend, env, sizes, key_inputs)


def start_engine(plan: Plan, held: HeldEngine | None = None) -> StartedEngine:
    """Reuse the cached engine or build it, then load it: the backend is ready to serve. A `held` engine (the one
    plan.backend already is) is ready as it is."""
    if held is not None:
        log.info("reusing the %s engine the job before left open", plan.backend.name)
        return StartedEngine(held.entry, 0.0, 0.0, reused=True)
    t = time.perf_counter()
    entry = plan.cache.get_or_build(plan.backend.name, plan.key_inputs, plan.backend.build)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    with progress(f"loading the {plan.backend.name} engine"):
        plan.backend.load(entry.path)
    return StartedEngine(entry, build_s, time.perf_counter() - t)
