"""`hydra/sweeper=optuna`: search build settings with Optuna 5 (the published plugin pins optuna<3).

Hydra imports every module under hydra_plugins/ on start-up to discover plugins, so this module stays light:
its config and a thin class; optuna and the search loop live in _impl.py, imported only when a sweep runs.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules while scanning for
# plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sweep_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sampler: str = "tpe"  # tpe | random | grid | gp
    seed: Optional[int] = 0
    n_trials: int = 20  # trials in the study in all, counting those of an earlier, resumed invocation
    n_jobs: int = 1  # trials asked for at once and handed to the launcher as one batch
    study_name: Optional[str] = None  # default: "<experiment>-<model>-<backend>"
    storage: Optional[str] = None  # default: sqlite:///<cwd>/mlruns/optuna.db, beside the MLflow store
    # figure -> maximize | minimize; empty: the task's own objective.metric / objective.direction.
    # Two or more give a multi-objective study and a Pareto front.
    objectives: Dict[str, str] = field(default_factory=dict)
    # figure -> "<=200" or ">=100": feasibility through Optuna's trial.set_constraint
    constraints: Dict[str, str] = field(default_factory=dict)
    max_failure_rate: float = 0.5  # stop once more than this share of n_trials crashed
    # the search space in Hydra's sweep syntax, e.g. {engine.max_batch_size: "choice(1,2,4,8)"}
    params: Dict[str, str] = field(default_factory=dict)
    best_config_dir: Optional[str] = None  # default: conf/best/ (rerun with `python -m sweep +best=<study>`)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sweep")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.sweep_optuna_sweeper._impl import OptunaSearch

        self.search = OptunaSearch(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.search.sweep(arguments)
