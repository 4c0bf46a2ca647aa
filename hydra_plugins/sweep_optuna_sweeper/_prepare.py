"""Everything a search could refuse, checked before the parent run and the first trial: the search space, the
sampler, objectives and constraints, the numbers, the study's name and storage, and each parallel trial's GPUs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution

from hydra_plugins.sweep_optuna_sweeper._samplers import GRID, SamplerChoice, check_sampler, choose_sampler
from hydra_plugins.sweep_optuna_sweeper._space import (
    command_keys,
    grid_values,
    parse_constraints,
    space_digest,
    space_identity,
    split_overrides,
)
from hydra_plugins.sweep_optuna_sweeper.config import SAMPLER_GROUP, OptunaSweeperConf
from sweep.multirun import sweeper_api
from sweep.multirun.sweeper_api import ConfigError

# Launchers (their _target_) that start every job of a batch at once, each in a fresh process on this host: the
# sweeper pins job i of a batch to GPU group i. submitit's local executor gives every job the same GPUs itself.
PINNED_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",)
# Launchers that run jobs in worker processes they keep for later jobs (joblib's loky): CUDA fixes a process's GPUs
# when it starts in it, so a later trial there would run on an earlier trial's GPUs, beside another trial.
REUSING_LAUNCHERS = ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",)
# Ray reuses its workers too, unless a task asks for GPUs: then each gets a fresh one with its own GPUs.
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
RAY_GPUS_KEY = "hydra.launcher.ray.remote.num_gpus"
# Launchers that ask a scheduler for hydra.sweeper.gpus_per_trial GPUs per trial, read from the config (conf/hydra/
# launcher/slurm.yaml, ray_gpus.yaml): the sweeper cannot raise that request for them.
SCHEDULED_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", RAY_LAUNCHER)
PARALLEL_KEYS = ("engine.tp_size", "engine.pp_size")
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


@dataclass
class SearchSettings:
    space: dict[str, BaseDistribution]
    fixed: list[str]
    objectives: dict[str, str]
    constraints: dict[str, tuple[str, float]]
    study_name: str
    storage_url: str
    n_trials: int
    command_keys: dict[str, str] = field(default_factory=dict)  # each swept key as the command line writes it


@dataclass
class Prepared:
    """A search ready to run: what it searches, with which sampler, for which model, where its trials run."""

    search: SearchSettings
    sampler: SamplerChoice
    model_id: str
    device: str
    gpu_slots: list[str] | None  # CUDA_VISIBLE_DEVICES of each job of a batch (see gpu_slots)
    gpus_per_trial: int  # hydra.sweeper.gpus_per_trial, or the engine's GPUs where it follows them (trial_gpus)


def check_numbers(st: OptunaSweeperConf) -> None:
    """The sweeper's numeric settings, each within what it can mean."""
    for key in ("n_trials", "n_jobs", "gpus_per_trial", "heartbeat_interval", "workers"):
        if getattr(st, key) < 1:
            raise ConfigError(f"hydra.sweeper.{key}={getattr(st, key)} is not allowed; it must be 1 or more")
    if st.grace_period is not None and st.grace_period < 1:
        raise ConfigError(f"hydra.sweeper.grace_period={st.grace_period} is not allowed; 1 or more seconds")
    if st.confirm_top_k < 0:
        raise ConfigError(f"hydra.sweeper.confirm_top_k={st.confirm_top_k} is not allowed; 0 or more")
    if st.budget_minutes is not None and st.budget_minutes <= 0:
        raise ConfigError(f"hydra.sweeper.budget_minutes={st.budget_minutes} is not allowed; above 0")


def largest_value(key: str, config: DictConfig, space: dict[str, BaseDistribution], fixed: list[str]) -> int:
    """The largest value an integer key takes in the search: swept, fixed on the command line, or the config's."""
    if key in space:
        values = grid_values({key: space[key]}).get(key) or [getattr(space[key], "high", 1)]
    else:
        given = [line.split("=", 1)[1] for line in fixed if line.lstrip("+~").split("=", 1)[0] == key]
        values = given[-1:] or [OmegaConf.select(config, key, default=1)]
    try:
        return max(int(v) for v in values)
    except (TypeError, ValueError):  # not an integer: each trial's own validation refuses it
        return 1


def trial_gpus(st: OptunaSweeperConf, config: DictConfig, space: dict[str, BaseDistribution], fixed: list[str]) -> int:
    """The GPUs each trial gets: hydra.sweeper.gpus_per_trial, which at its default (1) follows the search's largest
    engine.tp_size x largest engine.pp_size; a value set below that is refused, as is the default with a launcher
    that asks its scheduler for the configured number."""
    tp, pp = (largest_value(key, config, space, fixed) for key in PARALLEL_KEYS)
    need = tp * pp
    if need <= st.gpus_per_trial:
        return st.gpus_per_trial
    launcher = OmegaConf.select(config, "hydra.launcher._target_")
    if st.gpus_per_trial != 1 or launcher in SCHEDULED_LAUNCHERS:
        where = " (the launcher asks its scheduler for that many)" if launcher in SCHEDULED_LAUNCHERS else ""
        raise ConfigError(
            f"hydra.sweeper.gpus_per_trial={st.gpus_per_trial} is not allowed: this search's engines go up to "
            f"engine.tp_size={tp} x engine.pp_size={pp} = {need} GPUs, and each trial must get them{where}; set "
            f"hydra.sweeper.gpus_per_trial >= {need}"
        )
    return need


def gpu_slots(config: DictConfig, n_jobs: int, gpus_per_trial: int, device: str) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each of a batch's n_jobs parallel trials; None where the sweeper pins nothing.

    Only a launcher that starts each job in a fresh local process is pinned. The basic launcher runs one job at a
    time in this process; SLURM (submitit_slurm) and Ray (remote.num_gpus) give each job the GPUs it asks for.
    """
    launcher = OmegaConf.select(config, "hydra.launcher._target_")  # None in a config composed without Hydra's part
    if launcher in REUSING_LAUNCHERS and device == "cuda":
        choice = OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher")
        raise ConfigError(
            f"hydra/launcher={choice} with device=cuda is not allowed: it reuses its worker processes, and a "
            "process keeps the GPUs CUDA started with, so trials would not stay on their own GPUs; use "
            "hydra/launcher=submitit_local (a fresh process per trial) with hydra.sweeper.n_jobs and "
            "hydra.sweeper.gpus_per_trial"
        )
    if launcher == RAY_LAUNCHER and device == "cuda" and not OmegaConf.select(config, RAY_GPUS_KEY):
        raise ConfigError(
            f"{RAY_GPUS_KEY} is not set: Ray would give the trials no GPUs of their own and reuse "
            "its worker processes; set it to the GPUs per trial, or use hydra/launcher=ray_gpus (it asks for "
            "hydra.sweeper.gpus_per_trial)"
        )
    if launcher not in PINNED_LAUNCHERS:
        return None
    if config.hydra.launcher.gpus_per_node is not None:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={config.hydra.launcher.gpus_per_node} is not allowed with "
            "hydra/launcher=submitit_local: it gives every trial the same GPUs; leave it unset and set "
            "hydra.sweeper.gpus_per_trial (each parallel trial then gets GPUs of its own)"
        )
    try:
        groups = sweeper_api.gpu_groups(n_jobs, gpus_per_trial, "hydra.sweeper.n_jobs")
    except ConfigError as exc:
        raise ConfigError(f"{exc}, or a smaller hydra.sweeper.gpus_per_trial (now {gpus_per_trial})") from None
    return None if groups[0] is None else groups  # a machine without GPUs: nothing to pin


def identity(s: SearchSettings, model_id: str) -> dict[str, Any]:
    """What a study was made for: resuming it with anything else is refused (unless resume_mismatched)."""
    return {"model": model_id, "search_space": space_identity(s.space), "objectives": s.objectives}


def check_resume(s: SearchSettings, model_id: str, resume_mismatched: bool) -> None:
    if (path := sweeper_api.sqlite_path(s.storage_url)) is not None and not path.exists():
        return
    try:
        with sweeper_api.store_lock(s.storage_url):  # loading a study creates the storage's tables if missing
            stored = optuna.load_study(study_name=s.study_name, storage=s.storage_url).user_attrs.get("identity")
    except KeyError:  # no such study yet
        return
    wanted = identity(s, model_id)
    if stored is None or stored == wanted or resume_mismatched:
        return
    differ = ", ".join(k for k in wanted if stored.get(k) != wanted[k])
    raise ConfigError(
        f"hydra.sweeper.study_name={s.study_name!r} holds a study of another {differ} ({stored}); give another "
        "study_name, leave it out for one named after this search, or resume anyway with "
        "hydra.sweeper.resume_mismatched=true"
    )


def parse_sweeps(st: OptunaSweeperConf, arguments: Sequence[str], config_loader: Any) -> list:
    """hydra.sweeper.params, then the command line's overrides (the last of a key wins), parsed by Hydra."""
    parser = OverridesParser.create(config_loader=config_loader)
    params = [f"{k}={v}" for k, v in (st.params or {}).items()]
    try:
        return parser.parse_overrides(params + list(arguments))
    except OverrideParseException as exc:  # a preset's params: the command line's own were parsed by Hydra
        lines = [line.strip() for line in exc.message.splitlines()[:-1]]
        why = next((line.split("': ", 1)[1] for line in lines if "while evaluating" in line), lines[0])
        raise ConfigError(f"{exc.override} is not allowed: {why}; write it in Hydra's grammar ({GRAMMAR})") from None


def prepare(st: OptunaSweeperConf, config: DictConfig, arguments: Sequence[str], config_loader: Any = None) -> Prepared:
    """Check everything a sweep could refuse, before the parent run and the first trial; ConfigError if not."""
    sampler = choose_sampler(st.sampler, OmegaConf.select(config, f"hydra.runtime.choices.{SAMPLER_GROUP}"))
    overrides = parse_sweeps(st, arguments, config_loader)
    space, fixed = split_overrides(overrides)
    if not space:
        raise ConfigError(
            "no search space: give sweeps such as 'engine.max_batch_size=choice(1,2,4)' or a preset (search=...)"
        )
    objectives = dict(st.objectives or {}) or {config.objective.metric: config.objective.direction}
    for name, direction in objectives.items():
        sweeper_api.check_figure(f"hydra.sweeper.objectives.{name}", name)
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.objectives.{name}={direction!r} is not allowed; use maximize or minimize")
    constraints = parse_constraints(dict(st.constraints or {}))
    for name in constraints:
        sweeper_api.check_figure(f"hydra.sweeper.constraints.{name}", name)
    check_sampler(sampler, len(objectives))
    n_trials = st.n_trials
    if sampler.name == GRID:
        n_trials = min(n_trials, math.prod(len(v) for v in grid_values(space).values()))
    check_numbers(st)
    model_name, model_id = sweeper_api.model_identity(config.model)
    study_name = st.study_name
    if not study_name:
        prefix = OmegaConf.select(config, "hydra.runtime.choices.search", default=None) or config.tracker.experiment
        study_name = f"{prefix}-{model_name}-{config.backend.name}-{space_digest(space, objectives, model_id)}"
    sweeper_api.best_config_path(st.best_config_dir, study_name)  # a study name must be a file name
    storage_url = st.storage or f"sqlite:///{Path.cwd() / 'mlruns' / 'optuna.db'}"
    if not storage_url.startswith(("sqlite:///", "postgresql://", "postgresql+")):
        raise ConfigError(
            f"hydra.sweeper.storage={sweeper_api.redact(storage_url)!r} is not allowed; the study's workers share "
            "it through sqlite:///<file> (one host) or postgresql://<user>@<host>/<database> (any number of hosts)"
        )
    sweeper_api.check_storage_reachable(storage_url)
    gpus_per_trial = trial_gpus(st, config, space, fixed)
    if st.workers > 1:  # each worker gets its own GPUs: refuse what does not fit before anything runs
        sweeper_api.gpu_groups(st.workers, gpus_per_trial, "hydra.sweeper.workers")
    keys = command_keys(overrides)
    s = SearchSettings(space, fixed, objectives, constraints, study_name, storage_url, n_trials, keys)
    check_resume(s, model_id, st.resume_mismatched)
    device = sweeper_api.resolve_device(config.device)
    slots = gpu_slots(config, st.n_jobs, gpus_per_trial, device)
    return Prepared(s, sampler, model_id, device, slots, gpus_per_trial)
