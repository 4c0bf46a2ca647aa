"""Runtime settings of backend=hf: none beyond its name; it honours engine.* options only."""

from __future__ import annotations

from dataclasses import dataclass

from sweep.config.schema import BackendConfig


@dataclass
class HFBackendConfig(BackendConfig):
    name: str = "hf"
