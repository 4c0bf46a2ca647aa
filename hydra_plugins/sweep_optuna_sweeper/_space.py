"""The search space: Hydra's sweep syntax as Optuna distributions, the grid, constraints, a trial's overrides and
name. Functions of the overrides and the study only."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from decimal import Decimal
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweep.multirun.sweeper_api import ConfigError

CONSTRAINT = re.compile(r"^\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
SWEEPS = "choice(a,b,...), range(start,stop[,step]) or interval(low,high)"
INTERVAL_TAGS = ("log", "int")  # a log scale; integer values (int(interval(...)) says the same)


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
