"""The measure layer: the benchmark loop, figure arithmetic and registry, the hardware's telemetry, the summary table."""
