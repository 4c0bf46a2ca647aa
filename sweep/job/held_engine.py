"""The engine a multirun's job leaves open for the next job, when the next one would start the same engine.

A load sweep measures one engine at several rates, and loading an 8B engine (weights, compilation, CUDA graphs) takes
longer than measuring a rate. With `reuse_open_engine` (default true) a multirun's job that ends well keeps its engine
open; the next job takes it when nothing that builds or loads an engine differs (ENGINE_SECTIONS): only the workload,
SLO, objective, quality check or tracker. Any other job closes it first, so at most one engine is resident.

Hydra's basic sweeper runs a grid in one process, the last override varying fastest: name the engine's settings
first and the rates last (`backend=compiled,vllm workload.request_rate=4,8,16`) and each engine loads once.
"""

from __future__ import annotations

import atexit
import json
import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from sweep.backends.base import Backend
from sweep.backends.cache import CacheEntry

log = logging.getLogger(__name__)

# What builds or loads an engine; the rest of a config (workload, slo, objective, quality, tracker) only uses it.
ENGINE_SECTIONS = ("model", "backend", "engine", "device", "cache_dir")


@dataclass
class HeldEngine:
    identity: str
    backend: Backend  # loaded from entry.path
    entry: CacheEntry


_held: HeldEngine | None = None


def engine_identity(cfg: DictConfig) -> str:
    """These sections alone, resolved: a sweeper's config also holds hydra's, which does not resolve outside a job."""
    resolved = {}
    for k in ENGINE_SECTIONS:
        resolved[k] = OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
    return json.dumps(resolved, sort_keys=True)


def take(cfg: DictConfig) -> HeldEngine | None:
    """The open engine if `cfg` would start the same one (it stays held until the job hands it back or closes it);
    otherwise None, with any open engine closed first: its memory goes back before the next engine is planned."""
    if _held is not None and _held.identity == engine_identity(cfg):
        return _held
    close_held()
    return None


def hold(cfg: DictConfig, backend: Backend, entry: CacheEntry) -> None:
    """Keep `backend` open for the next job, in place of any other engine held."""
    global _held
    if _held is not None and _held.backend is not backend:
        close_held()
    _held = HeldEngine(engine_identity(cfg), backend, entry)


def close(backend: Backend) -> None:
    """Close `backend`, held or not (a job that failed closes its engine: it may be broken)."""
    global _held
    if _held is not None and _held.backend is backend:
        _held = None
    backend.close()


def close_held() -> None:
    """Close the open engine, if any: at the end of a multirun, and at exit after an interruption."""
    global _held
    held, _held = _held, None
    if held is not None:
        log.info("closing the %s engine left open by the job before", held.backend.name)
        held.backend.close()


atexit.register(close_held)
