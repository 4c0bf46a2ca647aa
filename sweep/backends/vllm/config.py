"""Runtime settings of backend=vllm (the engine's own options are engine.*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sweep.config.schema import BackendConfig


@dataclass
class VLLMBackendConfig(BackendConfig):
    """Runtime settings: they shape how the engine runs, not its compile cache, so they are not in the cache key."""

    name: str = "vllm"
    # gpu_memory_utilization: on a GPU the share of its memory for the engine; on the CPU the share of NUMA node 0's
    # memory for the worker (weights + KV cache). null: vLLM's default on a GPU; on the CPU a KV cache of exactly
    # engine.max_batch_size full-length sequences (kv_cache_memory_bytes), so nothing else is reserved.
    memory_fraction: Optional[float] = None
    # kv_cache_memory_bytes in GiB: an exact KV-cache size, instead of memory_fraction.
    kv_cache_gb: Optional[float] = None
    # vLLM's default; off, a prompt must fit engine.max_num_tokens and max_num_tokens >= max_seq_len.
    enable_chunked_prefill: bool = True
    # Off for benchmarks, or repeated prompts skip their prefill (like trt's block reuse).
    enable_prefix_caching: bool = False
    # vLLM's attention_backend (FLASH_ATTN, TRITON_ATTN, FLASHINFER, CPU_ATTN, ...); null: vLLM picks for the device.
    attention_backend: Optional[str] = None
    # Level of vLLM's records in sweep's log (its engine processes print warnings and errors to stderr).
    log_level: str = "WARNING"
