"""An engine started as a run starts it, for measurements below a whole run: generate a few requests, time decode
steps on their own, profile them. Nothing is recorded.

    from sweep import compose, open_engine
    with open_engine(compose(["backend=compiled", "engine.max_batch_size=8"])) as engine:
        tokens = [g.token_ids for g in engine.generate(engine.requests[:8])]
        figures = engine.time_decode(batch=8, context=512, steps=64)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from sweep.backends.base import DecodeLoop, Generation
from sweep.config.errors import ConfigError
from sweep.job.plan import Plan, make_plan, start_engine
from sweep.measure.decode import profile_decode, time_decode
from sweep.measure.metrics import roofline_figures
from sweep.measure.telemetry import device_bandwidth
from sweep.workload.requests import Request


@dataclass
class Engine:
    plan: Plan  # the model, workload, backend and device the engine was started for
    cache_hit: bool
    manifest: dict[str, Any]  # the engine's manifest: captured batch sizes, attention spans, compile caches, ...
    start_s: float  # the cache look-up (and the build on a miss) plus the load
    bandwidth: dict[str, Any] | None  # the device's memory bandwidth, measured before the engine loaded; None on a CPU

    @property
    def requests(self) -> list[Request]:
        """The measured requests of the config's workload."""
        return self.plan.workload.measured

    @property
    def device_name(self) -> str:
        return self.plan.env.get("gpu_name", "cpu") if self.plan.device == "cuda" else "cpu"

    @property
    def model_path(self) -> Path:
        return self.plan.model.path

    def generate(self, requests: list[Request]) -> list[Generation]:
        """Greedy generation of each request's output_len tokens, as one batch: token ids and their host times."""
        return self.plan.backend.generate(requests)

    def decode_loop(self, batch: int, context: int, steps: int, span: int | None = None) -> DecodeLoop:
        """The engine's decode step for `batch` rows from cache column `context` (sweep/backends/base.py), refused
        when `steps` of them would run past the columns it attends over."""
        loop = self.plan.backend.decode_loop(batch, context, span)
        if context + steps > loop.span:
            raise ConfigError(
                f"{steps} decode steps from column {context} run past the {loop.span} columns decode attends over; "
                "take fewer steps or a longer engine.max_seq_len"
            )
        return loop

    def time_decode(self, batch: int, context: int, steps: int, repeats: int = 1, span: int | None = None) -> dict:
        """The median ms of a decode step of `batch` rows from column `context` (`steps` back to back, `repeats`
        times), decode tok/s, and on a GPU the roofline figures at the steps' mean context. Run generate() on those
        rows first: the steps read their cache."""
        loop = self.decode_loop(batch, context, steps, span)
        step_ms = time_decode(loop, steps, repeats, self.plan.device == "cuda")
        out = {"batch": batch, "context": context, "span": loop.span, "decode_step_ms": step_ms}
        out["decode_tok_s"] = batch / (step_ms / 1e3)
        if self.bandwidth:
            bytes_per_s = self.bandwidth["bytes_per_s"]
            mean_context = context + steps / 2
            p = self.plan
            out.update(
                roofline_figures(p.sizes, p.model.shape.vocab_size, batch, mean_context, bytes_per_s, step_ms / 1e3)
            )
            out["device_bandwidth_gb_s"] = bytes_per_s / 1e9
        return out

    def profile_decode(self, batch: int, context: int, steps: int = 8, span: int | None = None) -> dict[str, Any]:
        """The GPU kernels of `steps` decode steps (sweep/measure/decode.py); {} on a CPU."""
        if self.plan.device != "cuda":
            return {}
        return profile_decode(self.decode_loop(batch, context, steps, span), steps)


@contextmanager
def open_engine(cfg: DictConfig) -> Iterator[Engine]:
    """Plan and start the engine of `cfg` as run() does (the same checks, cache and load), then close it."""
    p = make_plan(cfg)
    # Measured before the engine loads, as a run measures it: a resident engine skews it (sweep/measure/telemetry.py).
    bandwidth = device_bandwidth(p.cache.root, p.env) if p.device == "cuda" else None
    started = start_engine(p)
    try:
        yield Engine(p, started.entry.hit, started.entry.manifest, started.build_s + started.load_s, bandwidth)
    finally:
        p.backend.close()
