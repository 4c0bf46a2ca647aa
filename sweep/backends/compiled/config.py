"""Runtime settings of backend=compiled: none beyond its name; its build options are engine.*."""

from __future__ import annotations

from dataclasses import dataclass

from sweep.config import BackendConfig


@dataclass
class CompiledBackendConfig(BackendConfig):
    name: str = "compiled"
