"""Runtime settings of backend=compiled; its build options are engine.*."""

from __future__ import annotations

from dataclasses import dataclass

from sweep.config.schema import BackendConfig

SCHEDULERS = ("inflight", "static")


@dataclass
class CompiledBackendConfig(BackendConfig):
    name: str = "compiled"
    # inflight: requests join and leave the running batch between decode steps, prompts prefilled in chunks under
    # engine.max_num_tokens per step; static: every batch padded to max_batch_size and run to its end (waves).
    scheduler: str = "inflight"
