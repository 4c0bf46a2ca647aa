"""tensorrt_llm itself: its installed version (read without importing it), the import, log capture, streaming.

tensorrt_llm is imported only after its version is checked: importing it starts CUDA and MPI, and an unsupported
version may fail to import at all. Everything that needs it calls import_tensorrt_llm() first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from sweep.backends.base import Generation
from sweep.backends.trt.options import INSTALL_HINT, check_supported_version
from sweep.config.errors import ConfigError


def installed_version() -> Optional[str]:
    """tensorrt-llm's version from its package metadata, without importing it (importing starts CUDA and MPI)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return "unknown (no package metadata)"


def import_tensorrt_llm() -> Any:
    check_supported_version(installed_version())
    try:
        import tensorrt_llm
    except (ImportError, OSError) as exc:  # e.g. a missing libmpi or CUDA library
        raise ConfigError(f"tensorrt_llm is installed but does not import ({exc}); {INSTALL_HINT}") from None
    return tensorrt_llm


def plugin_field_defaults(plugin_config_class: Any) -> dict[str, Any]:
    if hasattr(plugin_config_class, "model_fields"):
        return {name: f.default for name, f in plugin_config_class.model_fields.items()}
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(plugin_config_class)}


def gpu_sm() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything written to stdout and stderr to `path`, at both levels.

    The builder logs from C++ and from MPI worker processes straight to file descriptors 1 and 2, so those are
    redirected; Python code writes to sys.stdout/sys.stderr, which need not be fds 1 and 2 (pytest, notebooks), so
    those are swapped too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as sink, open(path, "a", buffering=1) as text:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with redirect_stdout(text), redirect_stderr(text):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextmanager
def worker_environment(backend_cfg: Any) -> Iterator[None]:
    """The environment the executor's worker starts with, set while the LLM is created.

    The worker is another process: it reads its log level from TLLM_LOG_LEVEL (tensorrt_llm/logger.py), not from
    this process's logger. TLLM_WORKER_USE_SINGLE_PROCESS=1 runs the worker in this process instead of spawning it
    through mpi4py, whose spawn is a common first-run failure (NVIDIA/TensorRT-LLM#5495).
    """
    wanted = {"TLLM_LOG_LEVEL": backend_cfg.log_level}
    if backend_cfg.single_process_worker:
        wanted["TLLM_WORKER_USE_SINGLE_PROCESS"] = "1"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def split_build_time(construct_s: float, save_s: float, steps: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Separate the build from the executor start that `LLM(model=hf_dir, build_config=...)` also does.

    The constructor converts and builds (ModelLoader times each step into llm_build_stats.build_steps_info), then
    starts the executor: worker, engine load, KV cache. build_time_s = the timed steps + saving the engine;
    model_load_s = the rest of the constructor. Without step timings nothing can be separated: the whole
    constructor counts as the build.
    """
    if not steps:
        return {"build_time_s": construct_s + save_s}
    built = sum(seconds for _, seconds in steps)
    return {"build_time_s": built + save_s, "model_load_s": max(construct_s - built, 0.0)}


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no build log)"


# -- streaming: per-token host timestamps -------------------------------------------------------------------------


def abort_streams(streams: Sequence[Any], tasks: Sequence[Any]) -> None:
    """Stop every unfinished request: GenerationResult.abort() asks the executor to drop it
    (tensorrt_llm/executor/result.py), and cancelling its task stops waiting for it here."""
    for stream in streams:
        abort = getattr(stream, "abort", None)
        if abort is not None and not getattr(stream, "finished", False):
            try:
                abort()
            except Exception:  # the executor may be what failed; the error being raised says so
                pass
    for task in tasks:
        task.cancel()


async def collect_stream(stream: Any) -> Generation:
    """Timestamp each new token as its streamed response reaches this process.

    A streamed RequestOutput's outputs[0].token_ids grows with every response; the new ones are those past what we
    have. Tokens that arrive in one response share its timestamp: that is when they became available on the host.
    """
    ids: list[int] = []
    times: list[float] = []
    async for step in stream:
        new = list(step.outputs[0].token_ids[len(ids) :])
        now = time.perf_counter()
        ids += new
        times += [now] * len(new)
    return Generation(token_ids=ids, token_times=times)
