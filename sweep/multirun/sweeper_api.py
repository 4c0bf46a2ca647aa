"""What a sweeper plugin (hydra_plugins/sweep_optuna_sweeper) may use of sweep: this module and nothing else.

- `infeasible(cfg)`: every check a run makes before building, without building or recording anything;
- `write_result` / `read_result`: where a finished job leaves its figures (and run id) for the sweeper to read;
- tag names a trial's run carries, and the sweep's parent run (`tracker_location`: where its id is valid);
- the environment a sweep's worker processes share with it (`WORKER_ENV`, `PARENT_STAYS_OPEN_ENV`);
- the figure names objectives and constraints may use;
- `store_lock(url)`: serialises creating or migrating a SQLite or PostgreSQL storage across processes (and creates
  a SQLite file's directory); `sqlite_path(url)`: a SQLite storage's file, None for a server;
  `advisory_lock(engine, name)`: a named PostgreSQL lock (one study's workers, one at a time);
- `check_storage_reachable(url)`: a study's database server that does not answer is a ConfigError, in seconds;
- `model_identity`: a model config's name in records and what identifies its weights, without fetching them (for
  a study's name and its trials' run names);
- `memory_for_warm_start`: the free memory and model sizes a warm-start heuristic needs;
- where best configs are written: under the user's working directory, never outside it;
- `gpu_groups`: the GPUs each of several parallel trials or workers is pinned to;
- `refuse_search_without_multirun`: a search preset given without `-m` is an error, not a single run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sweep.config.errors import ConfigError
from sweep.config.schema import SLO_KEYS
from sweep.job import held_engine
from sweep.job.artifacts import RESULT_FILE, JobResult, read_result, write_result
from sweep.job.execute import SUMMARY_TO_LOG_ENV, refuse_search_without_multirun
from sweep.job.naming import PROBE_TAG, SWEPT_KEYS_ENV, TRIAL_TAG
from sweep.job.plan import make_plan, resolve_device
from sweep.job.validate import check_figure
from sweep.measure.figures import metric_names
from sweep.measure.gpus import GPU_ENV, free_gpu_memory_bytes, gpu_groups
from sweep.model.source import model_identity
from trackers import PARENT_RUN_ENV, TrackedRun, Tracker, make_tracker
from trackers.mlflow_tracker import default_uri
from trackers.store import StoreUnreachable, advisory_lock, check_store_reachable, redact, sqlite_path, store_lock

STUDY_TAG = "optuna_study"
WORKER_TAG = "optuna_worker"  # host:pid of the worker process that asked for the trial
# Set for the worker processes a sweep started (hydra.sweeper.workers=N): the starting process writes the summary.
WORKER_ENV = "SWEEP_WORKER"
# Set by a sweeper that leaves the parent run to other workers still on its study: the multirun callback then
# neither reports nor ends it; the last worker does.
PARENT_STAYS_OPEN_ENV = "SWEEP_PARENT_STAYS_OPEN"
STUDY_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
DEFAULT_BEST_CONFIG_DIR = Path("conf") / "best"

__all__ = [
    "RESULT_FILE",
    "STUDY_TAG",
    "SWEPT_KEYS_ENV",
    "TRIAL_TAG",
    "PROBE_TAG",
    "SUMMARY_TO_LOG_ENV",
    "PARENT_STAYS_OPEN_ENV",
    "WORKER_ENV",
    "WORKER_TAG",
    "ConfigError",
    "GPU_ENV",
    "JobResult",
    "WarmStartInputs",
    "best_config_path",
    "check_storage_reachable",
    "check_figure",
    "SLO_KEYS",
    "figure_unit",
    "gpu_groups",
    "infeasible",
    "memory_for_warm_start",
    "model_identity",
    "parent_run",
    "read_result",
    "store_lock",
    "sqlite_path",
    "advisory_lock",
    "redact",
    "refuse_search_without_multirun",
    "resolve_device",
    "tracker_location",
    "write_result",
]


def check_storage_reachable(url: str) -> None:
    try:
        check_store_reachable(
            "hydra.sweeper.storage",
            url,
            "start the database server or point hydra.sweeper.storage at one that runs (leave it out for SQLite "
            "under mlruns/)",
        )
    except StoreUnreachable as exc:
        raise ConfigError(str(exc)) from None


def infeasible(cfg: DictConfig) -> str | None:
    """Why a run of `cfg` would be refused before building (None when it would run). The job checked is the next to
    run: an engine left open that it would not reuse is closed now, so that its memory counts as free."""
    held = held_engine.take(cfg)
    try:
        make_plan(cfg, open_backend=held.backend if held else None)
    except ConfigError as exc:
        return str(exc)
    return None


def figure_unit(metric: str) -> str:
    figure = metric_names().get(metric)
    return figure.unit if figure else ""


@dataclass
class WarmStartInputs:
    free_bytes: float  # memory the engine may use for weights and KV cache
    memory_source: str  # where free_bytes came from, for the log
    model_bytes: int
    kv_bytes_per_token: int
    input_len: int
    output_len: int


def memory_for_warm_start(cfg: DictConfig) -> WarmStartInputs | str:
    """What a memory model needs to predict a good first point; a string says why there is none.

    On a GPU: the device's free memory now. On a CPU the KV cache lives in host memory, so the host's available
    memory stands in; the log line names which one was used.
    """
    try:
        plan = make_plan(cfg)
    except ConfigError as exc:
        return f"the base config is not runnable ({exc})"
    if plan.device == "cuda":
        free = free_gpu_memory_bytes()
        source = f"free GPU memory of {plan.env.get('gpu_name', 'the GPU')}"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        source = "available host memory (CPU run)"
    w = cfg.workload
    return WarmStartInputs(
        free, source, plan.sizes["model_bytes"], plan.sizes["kv_bytes_per_token"], w.input_len, w.output_len
    )


def parent_run(config: DictConfig) -> tuple[Tracker, TrackedRun] | None:
    """The sweep's parent run, opened by the multirun callback (sweep/multirun/callback.py); None when tracking is
    off."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if config.tracker.name == "none" or not run_id:
        return None
    tracker = make_tracker(config.tracker)
    return tracker, tracker.attach(run_id)


def tracker_location(tracker_cfg: Any) -> str | None:
    """Where a run id of this tracker config is valid: its store (without user info) and experiment; None untracked."""
    if tracker_cfg.name == "none":
        return None
    return f"{redact(tracker_cfg.uri or default_uri())} {tracker_cfg.experiment}"


def best_config_path(directory: str | None, study_name: str) -> Path:
    """conf/best/<study>.yaml under the working directory (or `directory`); a study name is a file name, no path."""
    if not STUDY_NAME.fullmatch(study_name):
        raise ConfigError(
            f"hydra.sweeper.study_name={study_name!r} cannot name a best-config file; use letters, digits, "
            "'_', '-' and '.', starting with a letter or digit"
        )
    root = Path(directory or DEFAULT_BEST_CONFIG_DIR).expanduser()
    return (root if root.is_absolute() else Path.cwd() / root) / f"{study_name}.yaml"
