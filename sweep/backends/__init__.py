"""Backends by name. Adding one: a module here with a Backend subclass, one line below, one YAML in conf/backend/."""
from sweep.backends.base import Backend, Generation
from sweep.backends.compiled import CompiledBackend
from sweep.backends.hf import HFBackend
from sweep.backends.trt import TRTBackend

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (HFBackend, TRTBackend, CompiledBackend)}

__all__ = ["BACKENDS", "Backend", "Generation"]
