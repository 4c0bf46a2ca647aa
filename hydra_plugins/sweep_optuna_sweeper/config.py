"""The sweeper's settings and its samplers, as Hydra configs (the schema of `hydra.sweeper.*`).

Each sampler is a config of the group hydra/sweeper/sampler: a `_target_` (an Optuna sampler class) and the
settings it takes, so that `hydra/sweeper/sampler=gp` picks one and `hydra.sweeper.sampler.n_startup_trials=5`
sets one of its settings. The sweeper instantiates only the targets registered here (SAMPLERS), checks the
settings against their dataclass, and seeds the sampler itself from hydra.sweeper.seed.

The group's options are stored as plain dicts, not as their dataclasses: a config that names a sampler,
`hydra: {sweeper: {sampler: grid}}`, then replaces the group's dict, as `hydra.sweeper.sampler=grid` does on the
command line (a typed node would refuse the string). Hydra imports this module while it scans for plugins: it
holds configs only.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules while scanning for
# plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SAMPLER_GROUP = "hydra/sweeper/sampler"
DEFAULT_SAMPLER = "tpe"


@dataclass
class TPESamplerConf:
    """Tree-structured Parzen estimator: one or several objectives, any space; the default."""

    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10  # random trials before the model takes over
    n_ei_candidates: int = 24
    group: bool = False  # model the parameters that occur together jointly (conditional spaces)
    constant_liar: bool = True  # parallel trials: treat the running ones as bad, so that they are not asked twice


@dataclass
class RandomSamplerConf:
    """Independent uniform draws: a baseline, and any number of objectives."""

    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf:
    """Every point of a space of choice() and range(), once, in a seeded order (enqueued by the sweeper)."""

    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class GPSamplerConf:
    """Gaussian process: few trials of a numeric space; one or several objectives."""

    _target_: str = "optuna.samplers.GPSampler"
    n_startup_trials: int = 10
    deterministic_objective: bool = False


@dataclass
class NSGAIISamplerConf:
    """Genetic algorithm for several objectives (a Pareto front); needs many trials."""

    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConf:
    """Quasi-Monte Carlo: an even cover of a numeric space, a better baseline than random."""

    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"  # sobol | halton
    scramble: bool = False


@dataclass
class CmaEsSamplerConf:
    """CMA-ES: one objective over a numeric space, many trials (needs the cmaes package)."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    n_startup_trials: int = 1
    popsize: Optional[int] = None
    consider_pruned_trials: bool = False
    use_separable_cma: bool = False
    with_margin: bool = False  # keeps integer and discrete parameters from collapsing to one value
    lr_adapt: bool = False


# name (hydra/sweeper/sampler=<name>) -> config: the only samplers the sweeper instantiates
SAMPLERS: Dict[str, Any] = {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "gp": GPSamplerConf,
    "nsgaii": NSGAIISamplerConf,
    "qmc": QMCSamplerConf,
    "cmaes": CmaEsSamplerConf,
}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sweep_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The sampler's config reaches the sweeper as plain data: it checks the target against SAMPLERS and seeds it.
    _recursive_: bool = False
    _convert_: str = "all"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": DEFAULT_SAMPLER}])
    # hydra/sweeper/sampler=<name> (SAMPLERS; docs/search.md: which fits what), its settings as
    # hydra.sweeper.sampler.<setting>=...; hydra.sweeper.sampler=<name> picks one with its default settings
    sampler: Any = MISSING
    seed: Optional[int] = 0  # the sampler's seed is this plus the trials the study already holds
    n_trials: int = 20  # trials in the study in all, counting those of an earlier, resumed invocation
    n_jobs: int = 1  # trials asked for at once and handed to the launcher as one batch
    # worker processes this command starts on this host, each asking the shared study for its next trial when free
    workers: int = 1
    # GPUs each trial (and each worker) gets: the sweeper pins them (CUDA_VISIBLE_DEVICES) with
    # hydra/launcher=submitit_local and hydra.sweeper.workers, the slurm and ray_gpus launcher presets ask their
    # scheduler for them (docs/scaling-out.md). At 1, a search of engines on several GPUs (engine.tp_size x
    # engine.pp_size) gives each trial its largest; a value set below that is refused.
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
for _name, _conf in SAMPLERS.items():
    ConfigStore.instance().store(group=SAMPLER_GROUP, name=_name, node=asdict(_conf()), provider="sweep")
