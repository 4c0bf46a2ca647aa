"""sweep: build (or reuse) an LLM inference engine, benchmark it, and record the run in MLflow.

The Python API is two functions, the same path `python -m sweep` takes:

    from sweep import compose, run
    result = run(compose(["backend=compiled", "engine.max_batch_size=8"]))
    result.figures["output_throughput_tok_s"], result.run_id, result.output_dir

and, for measurements below a whole run (what benchmarks/ does), an engine started the same way, then closed:

    from sweep import open_engine
    with open_engine(compose([...])) as engine:
        engine.generate(engine.requests[:8]), engine.time_decode(batch=8, context=512, steps=64)

token_match compares two engines' greedy tokens. Everything is imported on first use, so `import sweep` stays cheap
(the CLI's --help needs no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sweep.job.compose import compose
    from sweep.job.engine import Engine, open_engine
    from sweep.job.execute import RunResult, run
    from sweep.measure.decode import token_match

__all__ = ["Engine", "RunResult", "compose", "open_engine", "run", "token_match"]

_HOMES = {
    "compose": "sweep.job.compose",
    "run": "sweep.job.execute",
    "RunResult": "sweep.job.execute",
    "open_engine": "sweep.job.engine",
    "Engine": "sweep.job.engine",
    "token_match": "sweep.measure.decode",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
