"""`hydra/sweeper=optuna`: search build settings with Optuna 5 (the published plugin pins optuna<3).

Hydra imports every module under hydra_plugins/ on start-up to discover plugins, so this module stays light:
its config and a thin class; optuna and the search loop live in _impl.py, imported only when a sweep runs.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules while scanning for
# plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sweep_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sampler: str = "tpe"  # tpe | random | grid | gp | nsgaii | qmc | cmaes (README: which fits what)
    seed: Optional[int] = 0
    n_trials: int = 20  # trials in the study in all, counting those of an earlier, resumed invocation
    n_jobs: int = 1  # trials asked for at once and handed to the launcher as one batch
    # worker processes this command starts on this host, each asking the shared study for its next trial when free
    workers: int = 1
    # GPUs each trial (and each worker) gets: the sweeper pins them (CUDA_VISIBLE_DEVICES) with
    # hydra/launcher=submitit_local and hydra.sweeper.workers, the slurm and ray_gpus launcher presets ask their
    # scheduler for them (README: Scaling out)
    gpus_per_trial: int = 1
    # default: "<search preset or experiment>-<model>-<backend>-<hash of model identity, space and objectives>"
    study_name: Optional[str] = None
    resume_mismatched: bool = False  # resume a named study even if its space, objectives or model differ
    storage: Optional[str] = None  # default: sqlite:///<cwd>/mlruns/optuna.db, beside the MLflow store
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats in the storage
    grace_period: Optional[int] = None  # a trial without a heartbeat this long is failed (default 2 intervals)
    # figure -> maximize | minimize; empty: the task's own objective.metric / objective.direction.
    # Two or more give a multi-objective study and a Pareto front.
    objectives: Dict[str, str] = field(default_factory=dict)
    # figure -> "<=200" or ">=100": feasibility through Optuna's trial.set_constraint
    constraints: Dict[str, str] = field(default_factory=dict)
    max_failure_rate: float = 0.5  # stop once more than this share of n_trials crashed
    # the search space in Hydra's sweep syntax, e.g. {engine.max_batch_size: "choice(1,2,4,8)"}
    params: Dict[str, str] = field(default_factory=dict)
    allow_repeats: bool = False  # measure a point the study already measured again (default: reuse its figures)
    confirm_top_k: int = 0  # measure the best k again at the end; the best is chosen on the mean of both
    warm_start: bool = True  # first try the max_batch_size / max_num_tokens trtllm-bench's memory heuristic picks
    budget_minutes: Optional[float] = None  # ask for no batch that would likely end past this many minutes
    best_config_dir: Optional[str] = None  # default: conf/best/ (rerun with `python -m sweep +best=<study>`)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sweep")


def sweeper_settings(config: DictConfig) -> Dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(config.hydra.sweeper, resolve=True).items() if k != "_target_"}


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.sweep_optuna_sweeper._impl import OptunaSearch

        self.search = OptunaSearch(**settings)

    @staticmethod
    def check_config(config: DictConfig) -> None:
        """Every set-up error (search space, sampler, objectives, study), before the multirun records anything.

        Called by the multirun callback (sweep/multirun/callback.py) before it opens the parent run; raises ConfigError.
        """
        from hydra_plugins.sweep_optuna_sweeper._impl import OptunaSearch

        OptunaSearch(**sweeper_settings(config)).prepare(config, list(config.hydra.overrides.task))

    @staticmethod
    def shared_parent_run_id(config: DictConfig, start_parent: Callable[[], str]) -> str:
        """The MLflow parent run of the study's workers: the one they share, or `start_parent()` for the first.

        Called by the multirun callback (sweep/multirun/callback.py) instead of starting a parent of its own.
        """
        from hydra_plugins.sweep_optuna_sweeper._impl import OptunaSearch

        return OptunaSearch(**sweeper_settings(config)).shared_parent_run_id(config, start_parent)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.search.sweep(arguments)
