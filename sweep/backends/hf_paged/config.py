"""Runtime settings of backend=hf_paged: how much memory its paged KV cache takes (the engine's limits are engine.*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sweep.config.schema import BackendConfig


@dataclass
class HFPagedBackendConfig(BackendConfig):
    name: str = "hf_paged"
    # ContinuousBatchingConfig.num_blocks: KV pages of engine.tokens_per_block tokens (for every layer). null: on a GPU
    # the cache takes kv_memory_fraction of the free memory; on the CPU it holds engine.max_batch_size requests of
    # engine.max_seq_len tokens (transformers' own CPU default is 60% of the host's RAM).
    kv_blocks: Optional[int] = None
    # ContinuousBatchingConfig.max_memory_percent: share of the free GPU memory (after the weights) for the KV cache
    # and the step's buffers, when kv_blocks is null.
    kv_memory_fraction: float = 0.9
