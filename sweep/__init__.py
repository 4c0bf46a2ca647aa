"""sweep: build (or reuse) an LLM inference engine, benchmark it, and record the run in MLflow.

The Python API is two functions, the same path `python -m sweep` takes:

    from sweep import compose, run
    result = run(compose(["backend=compiled", "engine.max_batch_size=8"]))
    result.figures["output_throughput_tok_s"], result.run_id, result.output_dir

Both are imported on first use, so `import sweep` stays cheap (the CLI's --help needs no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sweep.job.compose import compose
    from sweep.job.execute import RunResult, run

__all__ = ["RunResult", "compose", "run"]

_HOMES = {"compose": "sweep.job.compose", "run": "sweep.job.execute", "RunResult": "sweep.job.execute"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
