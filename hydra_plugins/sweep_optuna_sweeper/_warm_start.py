"""The warm start: the first trial of a new study tries the batch size and token budget trtllm-bench's memory
heuristic predicts, and the config's own value of every other searched key."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.sweep_optuna_sweeper._space import settings_text
from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)

WARM_START_KEYS = ("engine.max_batch_size", "engine.max_num_tokens")


def trtllm_bench_setting(w: sweeper_api.WarmStartInputs, kv_fraction: float = 0.9) -> dict[str, int] | None:
    """max_batch_size and max_num_tokens from free memory, after trtllm-bench's build heuristic.

    The KV cache gets kv_fraction of what the weights leave free; the batch is the number of requests of the
    workload's input + output length it holds (capped at 4096), the token budget that batch times
    (1 + input/output) (capped at 32768), both rounded up to trtllm-bench's steps. None when not one request fits.
    """
    kv_bytes = (w.free_bytes - w.model_bytes) * kv_fraction
    requests = kv_bytes / (w.kv_bytes_per_token * (w.input_len + w.output_len))
    if requests < 1:
        return None
    raw_batch = min(requests, 4096)
    raw_tokens = min(raw_batch * (1 + w.input_len / max(w.output_len, 1)), 32768)
    batch_step = 32 if raw_batch < 256 else 128 if raw_batch < 1024 else 256
    token_step = 512 if raw_tokens < 2048 else 1024 if raw_tokens < 8192 else 2048
    return {
        "engine.max_batch_size": batch_step * math.ceil(raw_batch / batch_step),
        "engine.max_num_tokens": token_step * math.ceil(raw_tokens / token_step),
    }


def nearest_allowed(dist: BaseDistribution, target: int) -> Any | None:
    """The largest value of `dist` at or under target (else its smallest); None for a non-numeric choice."""
    if isinstance(dist, CategoricalDistribution):
        values = [v for v in dist.choices if isinstance(v, (int, float)) and not isinstance(v, bool)]
    elif isinstance(dist, IntDistribution):
        values = list(range(dist.low, dist.high + 1, dist.step)) if not dist.log else [dist.low, dist.high]
    else:
        return None
    if not values:
        return None
    under = [v for v in values if v <= target]
    return max(under) if under else min(values)


def holds(dist: BaseDistribution, value: Any) -> bool:
    """Whether `value` is one of the distribution's points (True is not the choice 1, nor 1.0 the choice 1)."""
    if isinstance(dist, CategoricalDistribution):
        return any(type(choice) is type(value) and choice == value for choice in dist.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution):  # range(a,b,step) is one: a value between its steps is not a point
        return isinstance(value, int) and dist.low <= value <= dist.high and (value - dist.low) % dist.step == 0
    if isinstance(dist, FloatDistribution):
        if not dist.low <= value <= dist.high:
            return False
        steps = (value - dist.low) / dist.step if dist.step else 0.0
        return math.isclose(steps, round(steps), abs_tol=1e-9)
    return False


def warm_start_point(
    space: dict[str, BaseDistribution], w: sweeper_api.WarmStartInputs, defaults: DictConfig | None = None
) -> dict[str, Any]:
    """trtllm-bench's batch size and token budget for the memory there is; every other searched key at its value in
    `defaults` (the composed config) when the space holds it, as trtllm-bench leaves the rest at the defaults. Left
    to the sampler, those keys would make the warm start's first trial a random draw."""
    predicted = trtllm_bench_setting(w)
    if predicted is None:
        return {}
    point = {}
    for key in WARM_START_KEYS:
        if key in space and (value := nearest_allowed(space[key], predicted[key])) is not None:
            point[key] = value
    if defaults is not None:
        for key, dist in space.items():
            value = OmegaConf.select(defaults, key, default=None)
            if key not in point and holds(dist, value):
                point[key] = value
    return point


def warm_start(
    study: optuna.Study,
    space: dict[str, BaseDistribution],
    fixed: list[str],
    compose: Callable[[list[str]], DictConfig],
) -> None:
    """On a new study, enqueue the point a memory model predicts, before the sampler takes over.

    compose(overrides) is the config a trial with those overrides would run: here, the search's fixed ones.
    """
    if study.trials or not any(key in space for key in WARM_START_KEYS):
        return
    try:
        defaults = compose(fixed)
        inputs = sweeper_api.memory_for_warm_start(defaults)
    except Exception as exc:  # a hint, never a reason to stop: the trials report their own errors
        inputs = f"{type(exc).__name__}: {exc}"
    if isinstance(inputs, str):
        log.info("warm start skipped: %s", inputs)
        return
    point = warm_start_point(space, inputs, defaults)
    if not point:
        log.info("warm start skipped: not one request fits in the %s", inputs.memory_source)
        return
    why = f"trtllm-bench's heuristic on {inputs.free_bytes / 1e9:.1f} GB of {inputs.memory_source}"
    study.enqueue_trial(point, user_attrs={"warm_start": why})
    log.info("warm start: the first trial tries %s (%s)", settings_text(point), why)
