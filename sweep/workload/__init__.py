"""The workload layer: the requests a run sends, the clock that offers them, and each request's timings."""
