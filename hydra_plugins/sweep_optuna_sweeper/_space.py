"""The search space: Hydra's sweep syntax as Optuna distributions, the grid, constraints, a trial's overrides and
name, and the warm start (trtllm-bench's memory heuristic picks the first trial of a new study)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from decimal import Decimal
from typing import Any, Callable, Sequence

import optuna
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweep.multirun import sweeper_api
from sweep.multirun.sweeper_api import ConfigError

log = logging.getLogger(__name__)

CONSTRAINT = re.compile(r"^\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
SWEEPS = "choice(a,b,...), range(start,stop[,step]) or interval(low,high)"
INTERVAL_TAGS = ("log", "int")  # a log scale; integer values (int(interval(...)) says the same)
WARM_START_KEYS = ("engine.max_batch_size", "engine.max_num_tokens")


def float_range(start: float, stop: float, step: float) -> list[float]:
    """Hydra's range() on floats, without its rounding error: range(0,1,0.3) is 0, 0.3, 0.6, 0.9 (not 0.8999…)."""
    d_start, d_stop, d_step = (Decimal(str(v)) for v in (start, stop, step))
    count = max(0, math.ceil((d_stop - d_start) / d_step))
    return [float(d_start + i * d_step) for i in range(count)]


def refuse(override: Override, why: str, allowed: str) -> ConfigError:
    return ConfigError(f"{override.input_line} is not allowed: {why}; {allowed}")


def distribution_for(override: Override) -> BaseDistribution:
    """Hydra sweep syntax → an Optuna distribution. Hydra's range() excludes its stop, like Python's."""
    sweep = override.value()
    if not isinstance(sweep, (ChoiceSweep, RangeSweep, IntervalSweep)):  # glob(): a group's options by pattern
        why = f"{type(sweep).__name__.lower()}() has no Optuna distribution"
        raise refuse(override, why, f"hydra/sweeper=optuna takes {SWEEPS} (a group's options: choice(a,b))")
    allowed_tags = INTERVAL_TAGS if isinstance(sweep, IntervalSweep) else ()
    unknown = sorted(set(sweep.tags) - set(allowed_tags))
    if unknown:
        allowed = "interval() takes tag(log, ...) and tag(int, ...)"
        why = f"the tag {unknown[0]!r} means nothing to the sweeper" if allowed_tags else "only interval() takes tags"
        raise refuse(override, why, allowed)
    log_scale = "log" in sweep.tags
    try:
        if isinstance(sweep, ChoiceSweep):
            return CategoricalDistribution([v for v in sweep.list])
        if isinstance(sweep, RangeSweep):
            if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
                values: list = list(range(sweep.start, sweep.stop, sweep.step))
            else:
                values = float_range(sweep.start, sweep.stop, sweep.step)
            if not values:
                raise ConfigError(f"{override.input_line} holds no value; the stop is exclusive, as in Python")
            low, high, step = min(values), max(values), abs(sweep.step)  # a negative step counts down
            if isinstance(low, int):
                return IntDistribution(low, high, step=step)
            return FloatDistribution(low, high, step=step)
        if "int" in sweep.tags or (isinstance(sweep.start, int) and isinstance(sweep.end, int)):
            low, high = math.ceil(sweep.start), math.floor(sweep.end)  # the integers within the bounds
            if sweep.start <= sweep.end and low > high:
                why = "an integer interval holds no integer between these bounds"
                raise refuse(override, why, "give bounds with an integer between them, or drop int for floats")
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    except ConfigError:
        raise
    except ValueError as exc:  # Optuna's own check (low > high, log of a bound <= 0): name the key
        raise ConfigError(f"{override.input_line}: {exc}") from None


def split_overrides(overrides: Sequence[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Sweeps become the search space; every other override stays fixed for all trials.

    The last override of a key wins: a value fixed on the command line takes the key out of a preset's space.
    """
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.key_or_group
        if override.is_sweep_override():
            fixed.pop(key, None)
            space[key] = distribution_for(override)
        else:
            space.pop(key, None)
            fixed[key] = override.input_line  # exactly as given, with any +/~ prefix
    return space, list(fixed.values())


def command_keys(overrides: Sequence[Override]) -> dict[str, str]:
    """Each swept key as a trial's command line writes it: `+note` for a key added to the config with `+`."""
    return {o.key_or_group: o.get_key_element() for o in overrides if o.is_sweep_override()}


def grid_values(space: dict[str, BaseDistribution]) -> dict[str, list]:
    grid = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            grid[name] = float_range(dist.low, dist.high + dist.step / 2, dist.step)
        else:
            raise ConfigError(
                f"hydra.sweeper.sampler=grid needs choice() or range() for every parameter; {name} is {dist}"
            )
    return grid


def enqueue_grid(study: optuna.Study, space: dict[str, BaseDistribution], seed: int | None) -> None:
    """Grid search as enqueued trials, in a seeded order, skipping points the study already holds.

    Optuna's GridSampler calls study.stop() when the grid is done, which only works inside study.optimize();
    this sweeper drives the study with ask/tell, so it enqueues the grid itself.
    """
    import random

    grid = grid_values(space)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(seed).shuffle(points)
    seen = [t.params for t in study.trials if t.state != TrialState.WAITING]
    for point in points:
        if point not in seen:
            study.enqueue_trial(point, skip_if_exists=True)


def parse_constraints(constraints: dict[str, str]) -> dict[str, tuple[str, float]]:
    parsed = {}
    for figure, rule in constraints.items():
        match = CONSTRAINT.match(str(rule))
        if not match:
            raise ConfigError(
                f"hydra.sweeper.constraints.{figure}={rule!r} is not allowed; write '<=value' or '>=value'"
            )
        parsed[figure] = (match.group(1), float(match.group(2)))
    return parsed


def constraint_violation(op: str, bound: float, value: float) -> float:
    """Optuna's convention: <= 0 is feasible, and the size says by how much it is violated."""
    return value - bound if op == "<=" else bound - value


def override_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) and not re.fullmatch(r"[\w.\-/]+", value) else str(value)


def overrides_for(fixed: list[str], params: dict[str, Any], keys: dict[str, str] | None = None) -> list[str]:
    """The command-line overrides of one point of the space: the fixed ones, then the sampled values, each under
    its key as `keys` (command_keys) writes it."""
    keys = keys or {}
    return fixed + [f"{keys.get(k, k)}={override_value(v)}" for k, v in params.items()]


def settings_text(params: dict[str, Any]) -> str:
    """`max_batch_size=8 attn_implementation=sdpa`: a trial's settings, by the last part of each key."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())


def space_digest(space: dict[str, BaseDistribution], objectives: dict[str, str], model: str) -> str:
    text = json.dumps({"model": model, "space": space_identity(space), "objectives": objectives}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def space_identity(space: dict[str, BaseDistribution]) -> dict[str, str]:
    return {k: repr(v) for k, v in sorted(space.items())}


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
