"""Runtime settings of backend=trt (the engine's own options are engine.*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sweep.config.schema import BackendConfig


@dataclass
class TRTBackendConfig(BackendConfig):
    """Runtime settings: they shape how the engine runs, not the engine, so they are not in the cache key."""

    name: str = "trt"
    # KvCacheConfig.free_gpu_memory_fraction: share of the free GPU memory (after the engine loads) for the KV cache.
    free_gpu_memory_fraction: float = 0.9
    # KvCacheConfig.enable_block_reuse: off for benchmarks, or repeated prompts skip their prefill.
    enable_block_reuse: bool = False
    # KvCacheConfig.max_tokens: a cap on KV cache tokens; null lets free_gpu_memory_fraction decide.
    max_tokens_in_kv_cache: Optional[int] = None
    # LLM(enable_chunked_prefill=...): needed when a prompt is longer than the engine's max_num_tokens.
    enable_chunked_prefill: bool = False
    # tensorrt_llm's logger level during build and serving (trtllm-build --log_level choices); the worker process
    # gets it through TLLM_LOG_LEVEL.
    log_level: str = "info"
    # TLLM_WORKER_USE_SINGLE_PROCESS=1: run the executor's worker in this process instead of an MPI-spawned one
    # (for machines where the mpi4py spawn fails; one GPU only).
    single_process_worker: bool = False
