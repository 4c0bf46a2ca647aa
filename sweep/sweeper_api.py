"""What a sweeper plugin (hydra_plugins/sweep_optuna_sweeper) may use of sweep: this module and nothing else.

- `infeasible(cfg)`: every check a run makes before building, without building or recording anything;
- `write_result` / `read_result`: where a finished job leaves its figures for the sweeper to read;
- tag names a trial's run carries, and the sweep's parent run;
- the figure names objectives and constraints may use;
- `store_lock(url)`: serialises creating or migrating a SQLite storage across processes;
- where best configs are written: under the user's working directory, never outside it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig

from sweep.errors import ConfigError
from sweep.plan import make_plan
from sweep.validate import check_figure, check_sweep
from trackers import PARENT_RUN_ENV, TrackedRun, Tracker, make_tracker
from trackers.store import store_lock

RESULT_FILE = "figures.json"  # in each job's Hydra output directory
TRIAL_TAG = "optuna_trial"
STUDY_TAG = "optuna_study"
STUDY_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
DEFAULT_BEST_CONFIG_DIR = Path("conf") / "best"

__all__ = [
    "RESULT_FILE",
    "STUDY_TAG",
    "TRIAL_TAG",
    "ConfigError",
    "best_config_path",
    "check_figure",
    "check_sweep",
    "infeasible",
    "parent_run",
    "read_result",
    "store_lock",
    "write_result",
]


def infeasible(cfg: DictConfig) -> str | None:
    """Why a run of `cfg` would be refused before building (None when it would run)."""
    try:
        make_plan(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def write_result(output_dir: Path, figures: dict[str, float]) -> None:
    (output_dir / RESULT_FILE).write_text(json.dumps(figures, indent=2))


def read_result(output_dir: Path) -> dict[str, float]:
    return json.loads((Path(output_dir) / RESULT_FILE).read_text())


def parent_run(config: DictConfig) -> tuple[Tracker, TrackedRun] | None:
    """The sweep's parent run, opened by the multirun callback (sweep/multirun.py); None when tracking is off."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if config.tracker.name == "none" or not run_id:
        return None
    tracker = make_tracker(config.tracker)
    return tracker, tracker.attach(run_id)


def best_config_path(directory: str | None, study_name: str) -> Path:
    """conf/best/<study>.yaml under the working directory (or `directory`); a study name is a file name, no path."""
    if not STUDY_NAME.fullmatch(study_name):
        raise ConfigError(
            f"hydra.sweeper.study_name={study_name!r} cannot name a best-config file; use letters, digits, "
            "'_', '-' and '.', starting with a letter or digit"
        )
    root = Path(directory or DEFAULT_BEST_CONFIG_DIR).expanduser()
    return (root if root.is_absolute() else Path.cwd() / root) / f"{study_name}.yaml"
