"""The search's sampler: hydra.sweeper.sampler (a config of the group hydra/sweeper/sampler, or a sampler's name)
checked against the samplers config.py registers, and the Optuna sampler made from it.

Only a registered `_target_` is instantiated: the sampler's config is user input, and an arbitrary target would
run arbitrary code. The seed is the sweeper's own (hydra.sweeper.seed plus the trials a study already holds), so a
resumed study draws new points instead of replaying the draws of its first invocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import optuna
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.sweep_optuna_sweeper.config import DEFAULT_SAMPLER, SAMPLERS
from sweep.multirun.sweeper_api import ConfigError

SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
GRID = "grid"  # its points are enqueued by the sweeper (space.enqueue_grid) and drawn by a random sampler


@dataclass(frozen=True)
class SamplerChoice:
    name: str  # the name in config.SAMPLERS
    target: str  # the Optuna sampler class
    settings: dict[str, Any]  # its keyword arguments, but the seed

    def make(self, seed: int | None) -> optuna.samplers.BaseSampler:
        if self.name == GRID:  # Optuna's GridSampler stops the study itself, which only works inside optimize()
            return optuna.samplers.RandomSampler(seed=seed)
        return get_class(self.target)(seed=seed, **self.settings)


def sampler_names() -> str:
    return ", ".join(SAMPLERS)


def choose_sampler(sampler: Any, group_choice: str | None = None) -> SamplerChoice:
    """hydra.sweeper.sampler: a name (its default settings) or a config with a registered `_target_`.

    group_choice: the option of hydra/sweeper/sampler the config was composed with; a name given besides another
    option than the default would silently replace it.
    """
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={sampler!r} is not allowed; choose one of: {sampler_names()}")
        if group_choice not in (None, DEFAULT_SAMPLER, sampler):
            raise ConfigError(
                f"hydra.sweeper.sampler={sampler} and hydra/sweeper/sampler={group_choice} pick two samplers; keep "
                "one: hydra/sweeper/sampler=<name> (with hydra.sweeper.sampler.<setting>=...) or "
                "hydra.sweeper.sampler=<name> (its default settings)"
            )
        name, given = sampler, {}
    elif isinstance(sampler, Mapping):
        by_target = {conf._target_: name for name, conf in SAMPLERS.items()}
        target = sampler.get("_target_")
        if target not in by_target:
            raise ConfigError(
                f"hydra.sweeper.sampler._target_={target!r} is not allowed; the sweeper instantiates only its own "
                f"samplers: hydra/sweeper/sampler=<name>, one of {sampler_names()}"
            )
        name, given = by_target[target], {k: v for k, v in sampler.items() if k != "_target_"}
    else:
        raise ConfigError(f"hydra.sweeper.sampler={sampler!r} is not allowed; choose one of: {sampler_names()}")
    schema = OmegaConf.structured(SAMPLERS[name])
    for key, value in given.items():  # each setting must be the sampler config's, of its type
        try:
            OmegaConf.merge(schema, {key: value})
        except OmegaConfBaseException as exc:
            settings = ", ".join(k for k in schema if k != "_target_") or "none"
            why = str(exc).splitlines()[0]
            if key not in schema:
                why = "the sweeper seeds the sampler (hydra.sweeper.seed)" if key == "seed" else "no such setting"
            raise ConfigError(
                f"hydra.sweeper.sampler.{key}={value!r} is not allowed ({name}): {why}; its settings: {settings}"
            ) from None
    settings = OmegaConf.to_container(OmegaConf.merge(schema, given))
    return SamplerChoice(name, settings.pop("_target_"), settings)


def check_sampler(choice: SamplerChoice, n_objectives: int) -> None:
    """What a sampler cannot do with this study, without its package, or with these settings."""
    if choice.name in SINGLE_OBJECTIVE_SAMPLERS and n_objectives > 1:
        raise ConfigError(
            f"hydra.sweeper.sampler={choice.name} optimises one objective, {n_objectives} are given; "
            "use nsgaii, tpe, gp or random for several"
        )
    if choice.name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("hydra.sweeper.sampler=cmaes needs the cmaes package: pip install cmaes") from None
    try:
        choice.make(seed=0)
    except ValueError as exc:  # Optuna's own check of a setting (qmc_type, population_size, ...)
        raise ConfigError(f"hydra.sweeper.sampler ({choice.name}): {exc}") from None


def sampler_seed(seed: int | None, trials_in_study: int, opened_before: int) -> int | None:
    """A seeded sampler replays its draws: resumed, the study would ask for the points it already holds, and two
    workers opening it at once (the same trials) would ask for the same points; the openings before this one tell
    them apart. Still reproducible: the same sweep started again draws the same points."""
    return None if seed is None else seed + trials_in_study + OPENING_STRIDE * opened_before


OPENING_STRIDE = 1_000_003  # a prime above any study's trial count: one opening's seeds never meet another's
