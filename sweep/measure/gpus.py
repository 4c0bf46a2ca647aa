"""Which GPUs each parallel trial or worker gets: contiguous groups of the visible GPUs, as CUDA_VISIBLE_DEVICES.

A group may hold several GPUs (`gpus_per_trial`), so a trial that needs two (tensor parallel) gets two. Visible
means what this process may use: $CUDA_VISIBLE_DEVICES when set (a SLURM allocation, a user's pick), otherwise
every GPU NVML counts. On a machine without GPUs there is nothing to pin and every group is None.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from sweep.config.errors import ConfigError

GPU_ENV = "CUDA_VISIBLE_DEVICES"


def listed_gpus() -> list[str] | None:
    """The GPUs $CUDA_VISIBLE_DEVICES lists (indices or UUIDs), None when it is not set."""
    listed = os.environ.get(GPU_ENV)
    return None if listed is None else [g.strip() for g in listed.split(",") if g.strip()]


@contextlib.contextmanager
def nvml_session() -> Iterator[Any]:
    """pynvml, initialised for the block and shut down after it."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def visible_gpus() -> list[str]:
    listed = listed_gpus()
    if listed is not None:
        return listed
    try:
        with nvml_session() as nvml:
            return [str(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception:  # no driver, no NVML: a CPU machine
        return []


def gpu_groups(count: int, gpus_per_trial: int, key: str, visible: list[str] | None = None) -> list[str | None]:
    """`count` disjoint groups of `gpus_per_trial` GPUs each; ConfigError naming `key` if they do not fit."""
    if gpus_per_trial < 1:
        raise ConfigError(f"gpus_per_trial={gpus_per_trial} is not allowed; 1 or more")
    visible = visible_gpus() if visible is None else visible
    if not visible:
        return [None] * count
    fits = len(visible) // gpus_per_trial
    if count > fits:
        raise ConfigError(
            f"{key}={count} with {gpus_per_trial} GPU(s) each needs {count * gpus_per_trial} GPUs, and "
            f"{len(visible)} are visible ({GPU_ENV}={','.join(visible)}); allowed: {key} <= {fits}"
        )
    return [",".join(visible[i * gpus_per_trial : (i + 1) * gpus_per_trial]) for i in range(count)]


def nvml_handle(nvml, cuda_index: int = 0):
    """NVML's handle of the GPU that CUDA calls `cuda_index` in this process.

    NVML numbers every GPU of the machine and ignores $CUDA_VISIBLE_DEVICES: a trial pinned to GPU 3 sees it as
    cuda:0, and NVML's index 0 would be another trial's GPU.
    """
    listed = listed_gpus()
    if listed is None:
        return nvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entry = listed[cuda_index]
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    return nvml.nvmlDeviceGetHandleByUUID(entry)  # GPU-… or MIG-… identifiers


def free_gpu_memory_bytes() -> int:
    """Free memory of this process's first GPU, read through NVML: torch's mem_get_info would open a CUDA context
    that holds memory on that GPU for as long as the process (a sweeper) lives."""
    with nvml_session() as nvml:
        return nvml.nvmlDeviceGetMemoryInfo(nvml_handle(nvml)).free
