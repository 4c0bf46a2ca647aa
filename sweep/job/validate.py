"""Value ranges and choices that the schema's types alone do not express, checked before anything is loaded.

Reads the backend registry and the figure registry; imports no backend library.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable
from urllib.parse import urlsplit

from sweep.backends.registry import BACKENDS
from sweep.config.errors import ConfigError
from sweep.config.schema import (
    ATTN_IMPLEMENTATIONS,
    COMPILE_MODES,
    DEVICES,
    DIRECTIONS,
    DTYPES,
    GENERATORS,
    KV_CACHE_DTYPES,
    LENGTH_DISTRIBUTIONS,
    PLUGIN_DTYPES,
    QUANTIZATIONS,
    SCENARIOS,
    SLO_KEYS,
)
from sweep.measure.figures import objective_names, unknown_figure_message
from sweep.model.shapes import SHAPES
from trackers.store import redact, scheme_of

# sqlite, a tracking server, or a database MLflow can use; the file store refuses to start in mlflow >= 3.13.
TRACKER_URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
MAX_REQUESTS = 100_000  # per iteration: more would spend minutes making the workload before anything shows
MAX_ITERATIONS = 1000
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds
NEEDS_SLO = ("goodput_", "slo_attainment_pct")
NEEDS_OPEN_LOOP = ("offered_rate_req_s", "achieved_rate_req_s")


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def at_least(key: str, value: Any, minimum: float) -> None:
    if math.isnan(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be >= {minimum}")


def positive(key: str, value: Any) -> None:
    if math.isnan(value) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be > 0")


def at_most(key: str, value: Any, maximum: float, why: str) -> None:
    if value > maximum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be <= {maximum} ({why})")


def finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a finite number")


def check_tracker(t: Any) -> None:
    if not str(t.experiment).strip():
        raise ConfigError(f"tracker.experiment={t.experiment!r} is not allowed; name the MLflow experiment")
    if t.name != "mlflow":
        return
    key, uri = ("tracker.uri", t.uri) if t.uri else ("$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri:
        return  # the default store, sqlite under the working directory
    parts = urlsplit(uri)
    if scheme_of(uri) not in TRACKER_URI_SCHEMES or not (parts.netloc or parts.path.strip("/")):
        raise ConfigError(
            f"{key}={redact(uri)!r} is not allowed; use sqlite:///<path to a .db file> or the URL of a tracking "
            f"server or database ({', '.join(s + '://' for s in TRACKER_URI_SCHEMES[1:])})"
        )


def check_figure(key: str, name: str) -> None:
    """A figure named as an objective or a constraint must be one a run records, with a direction."""
    if name not in objective_names():
        raise ConfigError(unknown_figure_message(key, name))


def validate(cfg: Any) -> None:
    m, e, w = cfg.model, cfg.engine, cfg.workload
    if not (m.path or m.hub_id or m.generate):
        raise ConfigError(f"model={m.name!r} has no source; set model.path, model.hub_id or model.generate")
    if m.generate and not (m.path or m.hub_id):
        choice("model.generate", m.generate, GENERATORS)
        choice("model.shape", m.shape, tuple(SHAPES))
    choice("model.dtype", m.dtype, DTYPES[1:])
    for key, seed in (("model.seed", m.seed), ("workload.seed", cfg.workload.seed)):
        at_least(key, seed, 0)
        at_most(key, seed, MAX_SEED, "a 32-bit seed")
    choice("backend.name", cfg.backend.name, tuple(BACKENDS))
    choice("device", cfg.device, DEVICES)
    choice("engine.dtype", e.dtype, DTYPES)
    choice("engine.attn_implementation", e.attn_implementation, ATTN_IMPLEMENTATIONS)
    choice("engine.compile_mode", e.compile_mode, COMPILE_MODES)
    choice("engine.gemm_plugin", e.gemm_plugin, PLUGIN_DTYPES)
    choice("engine.gpt_attention_plugin", e.gpt_attention_plugin, PLUGIN_DTYPES)
    choice("engine.quantization", e.quantization, QUANTIZATIONS)
    choice("engine.kv_cache_dtype", e.kv_cache_dtype, KV_CACHE_DTYPES)
    for key in (
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "max_num_tokens",
        "tokens_per_block",
        "tp_size",
        "pp_size",
    ):
        at_least(f"engine.{key}", e[key], 1)
    for size in e.cuda_graph_batch_sizes or ():
        if not 1 <= size <= e.max_batch_size:
            raise ConfigError(
                f"engine.cuda_graph_batch_sizes={list(e.cuda_graph_batch_sizes)} is not allowed; "
                f"every size must be between 1 and engine.max_batch_size={e.max_batch_size}"
            )
    choice("workload.scenario", w.scenario, SCENARIOS)
    choice("workload.length_distribution", w.length_distribution, LENGTH_DISTRIBUTIONS)
    for key in ("num_requests", "iterations", "input_len", "output_len"):
        at_least(f"workload.{key}", w[key], 1)
    for key in ("input_len_std", "output_len_std"):
        finite(f"workload.{key}", w[key])
    for key in ("warmup_requests", "input_len_std", "output_len_std"):
        at_least(f"workload.{key}", w[key], 0)
    for key in ("num_requests", "warmup_requests"):
        at_most(f"workload.{key}", w[key], MAX_REQUESTS, "a larger workload takes minutes just to make")
    at_most("workload.iterations", w.iterations, MAX_ITERATIONS, "repeat the run instead")
    if w.batch_size is not None:
        at_least("workload.batch_size", w.batch_size, 1)
        if w.batch_size > e.max_batch_size:
            raise ConfigError(
                f"workload.batch_size={w.batch_size} is not allowed; "
                f"it must be <= engine.max_batch_size={e.max_batch_size}"
            )
    at_least("workload.concurrency", w.concurrency, 1)
    positive("workload.request_rate", w.request_rate)  # inf is allowed: every request at t0
    positive("workload.burstiness", w.burstiness)
    if math.isinf(w.burstiness):
        raise ConfigError(f"workload.burstiness={w.burstiness!r} is not allowed; it must be a finite number > 0")
    for key in SLO_KEYS:
        if cfg.slo[key] is not None:
            positive(f"slo.{key}", cfg.slo[key])
    for key in ("prompts", "tokens"):
        at_least(f"quality.{key}", cfg.quality[key], 1)
    check_figure("objective.metric", cfg.objective.metric)
    check_recordable("objective.metric", cfg.objective.metric, cfg)
    choice("objective.direction", cfg.objective.direction, DIRECTIONS)
    choice("tracker.name", cfg.tracker.name, ("mlflow", "none"))
    check_tracker(cfg.tracker)


def check_recordable(key: str, metric: str, cfg: Any) -> None:
    """A figure named as an objective must be one that runs of `cfg` record: goodput needs an SLO, the offered and
    achieved rates an open loop. What the workload's lengths and the device decide is checked by the plan."""
    w = cfg.workload
    if metric.startswith(NEEDS_SLO) and all(cfg.slo[k] is None for k in SLO_KEYS):
        raise ConfigError(
            f"{key}={metric!r} is recorded only under an SLO, and slo={cfg.slo.name!r} sets none; set slo=interactive "
            "or slo=batch, or slo.ttft_ms / slo.tpot_ms / slo.e2e_ms"
        )
    open_loop = w.scenario == "rate" and math.isfinite(w.request_rate) and w.num_requests >= 2
    if metric in NEEDS_OPEN_LOOP and not open_loop:
        raise ConfigError(
            f"{key}={metric!r} is recorded only by an open loop (workload=rate at a finite workload.request_rate, "
            f"2 or more requests), and this run's workload.scenario is {w.scenario!r}"
            + (f" at workload.request_rate={w.request_rate}" if w.scenario == "rate" else "")
            + "; use workload=rate workload.request_rate=<requests per second>"
        )


def check_sweep(config: Any, swept: Iterable[str]) -> None:
    """What every multirun needs before its parent run opens: each objective and constraint a figure that its runs
    will record. Not judged here when the sweep varies what decides it (the SLO, the workload, the objective): each
    run then checks its own."""
    if any(k.startswith(("slo", "workload", "objective")) for k in swept):
        return
    sweeper = config.hydra.sweeper
    objectives = dict(sweeper.get("objectives") or {}) or {config.objective.metric: config.objective.direction}
    for name in objectives:
        key = "hydra.sweeper.objectives." + name if sweeper.get("objectives") else "objective.metric"
        check_recordable(key, name, config)
    for name in sweeper.get("constraints") or {}:
        check_recordable(f"hydra.sweeper.constraints.{name}", name, config)
