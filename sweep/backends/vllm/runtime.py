"""vLLM in sweep's process: the environment it runs in, its import, and its config without starting anything.

vLLM's front end (AsyncLLM) runs in sweep's process; its engine core and its worker (the model, the KV cache, the
OMP threads) run in processes it spawns. Building a vLLM config changes the host process: it sets LD_PRELOAD,
VLLM_WORKER_MULTIPROC_METHOD, KMP_* and more in os.environ (for the processes it spawns), and by default it
replaces the logging record factory and puts its own handler on stdout. So:
- vLLM is imported and configured only inside `vllm_environ()`, which restores os.environ when it ends (a check,
  or the engine's lifetime), so a later run or another backend in the same process (a sweep) starts clean;
- VLLM_CONFIGURE_LOGGING=0 leaves vLLM's records to sweep's own logging (its file log and console), at
  backend.log_level; its engine processes print only warnings and errors, to stderr;
- usage reporting is off (it would try the network).
A whole separate process for the front end would isolate more, but the tokens would then reach sweep's clock
through one more hop; here they are stamped the moment the front end hands them over, as trt's are.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from sweep.backends.vllm.options import INSTALL_HINT, check_supported_version, installed_version
from sweep.config.errors import ConfigError

ENGINE_ENV = {
    "VLLM_CONFIGURE_LOGGING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# The legacy KV-cache size in GiB overrides kv_cache_memory_bytes when set; sweep sizes the cache itself.
UNSET = ("VLLM_CPU_KVCACHE_SPACE",)


@contextmanager
def vllm_environ(log_level: str, cache_root: Optional[Path] = None) -> Iterator[None]:
    """os.environ for vLLM (and the processes it spawns) inside, as it was before on exit."""
    saved = os.environ.copy()
    os.environ.update(ENGINE_ENV)
    if importlib.util.find_spec("flashinfer") is None:  # vLLM's GPU sampler would import it at the first request
        os.environ["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    for name in UNSET:
        os.environ.pop(name, None)
    if cache_root is not None:  # vLLM's torch.compile cache (and its model-info files) go here
        os.environ["VLLM_CACHE_ROOT"] = str(cache_root)
    logging.getLogger("vllm").setLevel(log_level)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def import_vllm() -> Any:
    """vLLM itself, after its version was checked; call inside vllm_environ()."""
    check_supported_version(installed_version())
    try:
        import vllm
    except (ImportError, OSError) as exc:  # e.g. a torchvision built for another torch
        raise ConfigError(f"vLLM is installed but does not import ({exc}); {INSTALL_HINT}") from None
    return vllm


def engine_config(kwargs: dict[str, Any]) -> Any:
    """vLLM's VllmConfig for these AsyncEngineArgs keywords: its own validation, in-process, nothing started."""
    import_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        return AsyncEngineArgs(**kwargs).create_engine_config()
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"vLLM rejects the engine config: {one_line(str(exc))}") from None


def one_line(message: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
