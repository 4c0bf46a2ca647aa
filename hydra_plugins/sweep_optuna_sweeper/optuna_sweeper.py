"""`hydra/sweeper=optuna`: search build settings with Optuna 5 (the published plugin pins optuna<3).

Hydra imports every module under hydra_plugins/ whose name does not start with `_` while it scans for plugins, so
this one stays light: the thin plugin class over its settings (config.OptunaSweeperConf). The search lives in the
`_` modules, imported only when a sweep runs: _prepare (what a sweep could refuse), _search (the loop), _session
(the study's workers), _study, _trials, _samplers, _space (the space and the warm start), _budget and _record
(what a person sees).
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules while scanning for
# plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import fields
from typing import Any, Callable, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.sweep_optuna_sweeper.config import OptunaSweeperConf

INSTANTIATION_KEYS = ("_target_", "_recursive_", "_convert_", "defaults")


def sweeper_settings(**settings: Any) -> OptunaSweeperConf:
    """The sweeper's settings as their dataclass, from Hydra's keyword arguments (plain data, see _convert_)."""
    return OptunaSweeperConf(**{k: v for k, v in settings.items() if k not in INSTANTIATION_KEYS})


def settings_of(config: DictConfig) -> OptunaSweeperConf:
    """The settings of the sweep `config` describes (its hydra.sweeper node), as the sweeper gets them."""
    node = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    known = {f.name for f in fields(OptunaSweeperConf)}
    return sweeper_settings(**{k: v for k, v in node.items() if k in known})


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.sweep_optuna_sweeper._search import OptunaSearch

        self.search = OptunaSearch(sweeper_settings(**settings))

    @staticmethod
    def check_config(config: DictConfig) -> None:
        """Every set-up error (search space, sampler, objectives, study), before the multirun records anything.

        Called by the multirun callback (sweep/multirun/callback.py) before it opens the parent run; raises ConfigError.
        """
        from hydra_plugins.sweep_optuna_sweeper._search import OptunaSearch

        OptunaSearch(settings_of(config)).prepare(config, list(config.hydra.overrides.task))

    @staticmethod
    def shared_parent_run_id(config: DictConfig, start_parent: Callable[[], str]) -> str:
        """The MLflow parent run of the study's workers: the one they share, or `start_parent()` for the first.

        Called by the multirun callback (sweep/multirun/callback.py) instead of starting a parent of its own.
        """
        from hydra_plugins.sweep_optuna_sweeper._search import OptunaSearch

        return OptunaSearch(settings_of(config)).shared_parent_run_id(config, start_parent)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.search.sweep(arguments)
