"""The measure layer: the benchmark loop, figure arithmetic and registry, hardware telemetry, the summary table."""
