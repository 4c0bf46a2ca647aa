"""The device bandwidth cache: keyed on the board, not its name. The measurement itself needs a GPU (faked here)."""

from sweep import telemetry


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
