"""`hydra/sweeper=max_rate`: bisect workload.request_rate for the highest rate whose SLO attainment meets a target.

Hydra imports every module under hydra_plugins/ to discover plugins, so this one stays light: its config and a
thin class; the search lives in _impl.py.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules while scanning for
# plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import dataclass
from typing import Any, List

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class MaxRateSweeperConf:
    _target_: str = "hydra_plugins.sweep_max_rate_sweeper.max_rate_sweeper.MaxRateSweeper"
    start_rate: float = 1.0  # the first probe, requests/s; doubled until the SLO breaks, then bisected
    attainment: float = 99.0  # SLO attainment (%) a rate must reach to count as sustained
    tolerance: float = 0.1  # stop when the bracket [sustained, broken] is this narrow, relative to its top
    max_probes: int = 8  # runs in all, each an MLflow child run
    max_rate: float = 1024.0  # stop doubling here


ConfigStore.instance().store(group="hydra/sweeper", name="max_rate", node=MaxRateSweeperConf, provider="sweep")


class MaxRateSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.sweep_max_rate_sweeper._impl import MaxRateSearch

        self.search = MaxRateSearch(**settings)

    @staticmethod
    def check_config(config: DictConfig) -> None:
        """Set-up errors before the multirun records anything (the multirun callback calls it; raises ConfigError)."""
        from hydra_plugins.sweep_max_rate_sweeper._impl import check_config

        check_config(config)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.search.sweep(arguments)
