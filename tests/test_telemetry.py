"""The device bandwidth cache: keyed on the board, not its name. The measurement itself needs a GPU (faked here).
And which GPU NVML reads in a pinned process (NVML faked: no GPU here)."""

import pytest

from sweep.measure import telemetry


def test_bandwidth_is_cached_per_board_driver_and_memory_clock(tmp_path, monkeypatch):
    # Fake: the measurement (a GPU copy); each call returns a new figure so a cache hit is visible.
    measured = []

    def fake_measure():
        measured.append(1)
        return {"bytes_per_s": 4.2e12 + len(measured), "spread_pct": 1.0, "method": telemetry.BANDWIDTH_METHOD}

    monkeypatch.setattr(telemetry, "measure_device_bandwidth", fake_measure)
    board = {"gpu_name": "NVIDIA H200", "gpu_uuid": "GPU-a", "driver": "580.1", "gpu_mem_clock_mhz_max": 3201}
    first = telemetry.device_bandwidth(tmp_path, board)
    assert telemetry.device_bandwidth(tmp_path, board) == first and len(measured) == 1
    assert first["gpu_uuid"] == "GPU-a" and "idle device" in first["method"]
    for change in ({"gpu_uuid": "GPU-b"}, {"driver": "580.2"}, {"gpu_mem_clock_mhz_max": 2619}):
        assert telemetry.device_bandwidth(tmp_path, {**board, **change}) != first  # same name, another board
    assert len(measured) == 4


class RecordingNvml:
    """A stand-in for pynvml (no GPU here): records which GPU a handle was asked for."""

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("index", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("uuid", uuid)


@pytest.mark.parametrize(
    "visible,expected",
    [(None, ("index", 0)), ("3,5", ("index", 3)), ("GPU-8f2a,GPU-77", ("uuid", "GPU-8f2a")), (" 6 ", ("index", 6))],
)
def test_nvml_samples_the_gpu_cuda_calls_device_0(monkeypatch, visible, expected):
    # A trial pinned to GPU 3 sees it as cuda:0; NVML ignores CUDA_VISIBLE_DEVICES, so its index 0 would be
    # another trial's GPU (utilisation, power and energy of the wrong device).
    from sweep.measure.gpus import nvml_handle

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_handle(RecordingNvml()) == expected


def test_process_memory_counts_the_engines_worker_processes(monkeypatch):
    # vLLM serves from an engine-core process of its own: its device memory is the run's too. NVML is faked (no GPU
    # here); the worker is a real child process, found through /proc.
    import subprocess
    import sys
    from types import SimpleNamespace

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = __import__("os").getpid()
        assert {me, worker.pid} <= telemetry.process_tree(me)

        class ProcessNvml:
            NVMLError = RuntimeError

            def nvmlDeviceGetComputeRunningProcesses(self, handle):
                return [
                    SimpleNamespace(pid=me, usedGpuMemory=1e9),
                    SimpleNamespace(pid=worker.pid, usedGpuMemory=15e9),
                    SimpleNamespace(pid=1, usedGpuMemory=40e9),  # another user's process on the same GPU
                ]

        sampler = telemetry.GPUSampler.__new__(telemetry.GPUSampler)
        sampler.nvml, sampler.handle, sampler.pids = ProcessNvml(), None, telemetry.process_tree(me)
        assert sampler._process_memory() == 16e9
    finally:
        worker.kill()
        worker.wait()
