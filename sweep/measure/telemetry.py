"""What the hardware did during the measured window, and what it was: NVML sampling and environment facts.

A GPU figure on a CPU run is absent from the results, never 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sweep.measure.gpus import GPU_ENV, nvml_handle

log = logging.getLogger(__name__)

SAMPLE_PERIOD_S = 0.1


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no GPU, or no library: there is nothing to sample
        return None


class GPUSampler:
    """Samples one GPU every 100 ms on a thread: utilisation, process memory, SM clock, power; energy by difference."""

    def __init__(self, device_index: int = 0):
        self.nvml = _nvml()
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.nvml:
            self.handle = nvml_handle(self.nvml, device_index)
            self.idle_used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def __enter__(self) -> GPUSampler:
        if self.nvml:
            self.pids = process_tree(os.getpid())  # the engine's workers are running by now
            self._energy_start = self._energy_mj()
            self._t_start = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._energy_end = self._energy_mj()
            self._t_end = time.perf_counter()

    def _energy_mj(self) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError:
            return None

    def _process_memory(self) -> float:
        """Device memory of this process and the processes below it: vLLM's engine core and hf's tensor-parallel
        ranks hold the engine's memory in processes of their own."""
        nvml = self.nvml
        try:
            used = [
                float(proc.usedGpuMemory)
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                if proc.pid in self.pids and proc.usedGpuMemory is not None
            ]
            if used:
                return sum(used)
        except nvml.NVMLError:
            pass
        # Containers often hide PIDs from NVML: fall back to the device's use above the idle baseline.
        return float(nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.idle_used)

    def _run(self) -> None:
        nvml = self.nvml
        while not self._stop.is_set():
            util = nvml.nvmlDeviceGetUtilizationRates(self.handle)
            self.samples.append(
                {
                    "util": float(util.gpu),
                    "memory": self._process_memory(),
                    "sm_clock": float(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM)),
                    "power": nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
                }
            )
            self._stop.wait(SAMPLE_PERIOD_S)

    def figures(self, output_tokens: int) -> dict[str, float]:
        if not self.nvml or not self.samples:
            return {}
        col = lambda k: [s[k] for s in self.samples]  # noqa: E731
        figures = {
            "gpu_util_pct_mean": sum(col("util")) / len(self.samples),
            "gpu_util_pct_max": max(col("util")),
            "gpu_peak_memory_gb": max(col("memory")) / 1e9,
            "gpu_sm_clock_mhz_mean": sum(col("sm_clock")) / len(self.samples),
            "gpu_power_w_mean": sum(col("power")) / len(self.samples),
            "gpu_samples": len(self.samples),
        }
        if self._energy_start is not None and self._energy_end is not None:
            energy_j = (self._energy_end - self._energy_start) / 1e3
            figures["energy_j"] = energy_j
            if energy_j > 0:
                figures["tokens_per_j"] = output_tokens / energy_j
        return figures


def process_tree(root: int) -> set[int]:
    """`root` and every live process below it, from /proc (Linux, where NVML runs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
        except (OSError, IndexError, ValueError):  # the process ended while being read
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def torch_memory_figures(device: str) -> dict[str, float]:
    if device != "cuda":
        return {}
    import torch

    return {
        "torch_max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "torch_max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
    }


def host_peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, GPU identity and its state at start (clocks, power limit). GPU keys are absent on a CPU."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "sweep_git_commit": git_commit(),
        "host_cpu_count": os.cpu_count(),
        "device": device,
        # which machine and process ran it: a parallel sweep's trials run in processes of their own, on any node
        "host": platform.node(),
        "pid": os.getpid(),
    }
    if (gpus := os.environ.get(GPU_ENV)) is not None:  # the GPUs a parallel sweep pinned it to
        env["cuda_visible_devices"] = gpus
    if device != "cuda":
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(
        gpu_name=props.name,
        gpu_uuid=f"GPU-{props.uuid}",  # two boards of one name differ; the bandwidth cache is keyed on this
        gpu_compute_capability=f"{props.major}.{props.minor}",
        cuda=torch.version.cuda,
    )
    nvml = _nvml()
    if nvml:
        handle = nvml_handle(nvml)
        env.update(
            driver=nvml.nvmlSystemGetDriverVersion(),
            gpu_power_limit_w=nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1e3,
            gpu_sm_clock_mhz_at_start=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            gpu_mem_clock_mhz_at_start=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            gpu_mem_clock_mhz_max=nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM),
            gpu_memory_total_gb=nvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9,
        )
    return env


BANDWIDTH_SIZES_GIB = (1, 4)  # far past any L2 cache (an H200 has 60 MB)
BANDWIDTH_REPEATS = 20
BANDWIDTH_WARMUP_S = 1.0
BANDWIDTH_METHOD = (
    f"device-to-device copy of {' and '.join(map(str, BANDWIDTH_SIZES_GIB))} GiB, bytes read + written, "
    f"{BANDWIDTH_REPEATS} repeats per size timed with CUDA events after {BANDWIDTH_WARMUP_S:g} s of copies, on an idle "
    "device before any engine is loaded; the figure is the best size's median, its spread (max - min) / median"
)


def device_bandwidth(cache_dir: Path, env: dict[str, Any]) -> dict[str, Any]:
    """Device memory bandwidth (bytes/s) with its spread, measured once per board and cached.

    Call it before any engine is loaded: a resident engine (CUDA graphs, its memory pools, a hot or throttled
    board after a benchmark) moved the figure by 10% depending on which backend ran first. The cache key is the
    board's UUID, the driver and the maximum memory clock, not the GPU's name, which different boards share.
    """
    identity = {k: env.get(k) for k in ("gpu_uuid", "driver", "gpu_mem_clock_mhz_max")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "device" / f"bandwidth-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = {"gpu": env.get("gpu_name"), **identity, **measure_device_bandwidth()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)  # two runs measuring at once both write a whole file
    return result


def measure_device_bandwidth() -> dict[str, Any]:
    import torch

    medians: dict[int, float] = {}
    spreads: dict[int, float] = {}
    for gib in BANDWIDTH_SIZES_GIB:
        n = gib << 30
        try:
            src = torch.empty(n, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
        except torch.cuda.OutOfMemoryError:
            log.warning("no room for a %d GiB bandwidth measurement; skipped", gib)
            continue
        deadline = time.perf_counter() + BANDWIDTH_WARMUP_S  # clocks rise from idle before anything is timed
        while time.perf_counter() < deadline:
            dst.copy_(src)
            torch.cuda.synchronize()
        rates = []
        for _ in range(BANDWIDTH_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            rates.append(2 * n / (start.elapsed_time(end) / 1e3))
        del src, dst
        torch.cuda.empty_cache()  # the engine that loads next gets this memory back
        medians[gib] = statistics.median(rates)
        spreads[gib] = 100 * (max(rates) - min(rates)) / medians[gib]
    if not medians:
        raise RuntimeError(f"no room on the device for a {min(BANDWIDTH_SIZES_GIB)} GiB bandwidth measurement")
    best = max(medians, key=medians.__getitem__)
    log.info("device bandwidth: %s", ", ".join(f"{g} GiB {m / 1e9:.0f} GB/s" for g, m in medians.items()))
    return {
        "bytes_per_s": medians[best],
        "spread_pct": spreads[best],
        "size_gib": best,
        "median_gb_s_per_size": {str(g): m / 1e9 for g, m in medians.items()},
        "method": BANDWIDTH_METHOD,
    }
