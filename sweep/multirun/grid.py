"""A grid's points, every one checked before the first runs: a bad point refuses the whole grid at once.

Hydra's basic sweeper launches the points one after another, and a point that a run would refuse (a value out of
range, a workload that does not fit) showed only after the points before it had run. The multirun callback calls
`check_grid` first: each point's config is composed as the sweeper will compose it, then checked as a run checks
it before building. Two passes: the value checks of every point (no model, no torch: an error comes back in about
a second), then the planning checks (model, workload, backend, memory).
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from sweep.config.errors import ConfigError

GRID_SWEEPER = "BasicSweeper"


def is_grid(config: DictConfig) -> bool:
    return config.hydra.sweeper._target_.rsplit(".", 1)[-1] == GRID_SWEEPER


def grid_points(config: DictConfig, config_loader: Any) -> list[list[str]]:
    """Every job's overrides, in the sweeper's order: its params (hydra.sweeper.params), then the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(
        params + list(config.hydra.overrides.task)
    )
    (points,) = BasicSweeper.split_arguments(parsed, None)
    return points


def label(point: list[str], swept: set[str]) -> str:
    """What sets a point apart from the others: its swept settings (all of them for a grid of one point)."""
    varied = [o for o in point if o.split("=", 1)[0].lstrip("+~") in swept]
    return " ".join(varied or point)


def refusals(configs: dict[str, DictConfig], check: Callable[[DictConfig], None]) -> list[str]:
    found = []
    for name, cfg in configs.items():
        try:
            check(cfg)
        except ConfigError as exc:
            found.append(f"  {name}: {exc}")
    return found


def composition_error(exc: BaseException) -> str:
    """Hydra's composition error on one line, with its cause's first line (the value and what was expected)."""
    lines = [str(exc).strip()]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        lines.append(str(exc.__cause__).strip().splitlines()[0])
    return ": ".join(" ".join(line.split()) for line in lines)


def check_grid(config: DictConfig, swept: set[str]) -> None:
    """ConfigError listing every point of the grid a run would refuse, before any runs; None when all would run."""
    from hydra.core.global_hydra import GlobalHydra

    from sweep.job.plan import make_plan
    from sweep.job.validate import validate

    loader = GlobalHydra.instance().hydra.config_loader
    points = grid_points(config, loader)
    configs: dict[str, DictConfig] = {}
    bad = []
    for point in points:
        name = label(point, swept)
        try:
            configs[name] = loader.load_sweep_config(config, point)
        except Exception as exc:  # a value of the wrong type, an option that does not exist
            bad.append(f"  {name}: {composition_error(exc)}")
    for check in (validate, make_plan):
        bad += refusals(configs, check)
        if bad:
            raise ConfigError(
                f"{len(bad)} of the grid's {len(points)} points would be refused, so none runs:\n" + "\n".join(bad)
            )
