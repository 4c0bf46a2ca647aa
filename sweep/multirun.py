"""A Hydra callback that groups every multirun (a grid or a search) under one MLflow parent run, and reports it.

The parent's id travels to the jobs in $SWEEP_PARENT_RUN_ID, which launchers pass on to their workers.
A sweeper (hydra_plugins/sweep_optuna_sweeper) finds the parent the same way and logs the study into it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sweep.errors import ConfigError
from sweep.run import JOB_ERROR_FILE
from sweep.validate import check_sweep
from trackers import PARENT_RUN_ENV, make_tracker
from trackers.store import redact, redact_file

log = logging.getLogger(__name__)


class ParentRunCallback(Callback):
    def __init__(self) -> None:
        self.run: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except ConfigError:
            return  # no parent for a sweep that cannot run; its sweeper raises the error (Hydra swallows ours)
        if config.tracker.name == "none" or os.environ.get(PARENT_RUN_ENV):
            return  # nothing to record, or an outer sweep already owns the parent
        overrides = list(config.hydra.overrides.task)
        tags = {"sweep.kind": "multirun", "sweep.sweeper": config.hydra.sweeper._target_.rsplit(".", 1)[-1]}
        try:
            self.run = make_tracker(config.tracker).start_run(config.tracker.run_name or "sweep", tags)
            self.run.log_params({"sweep.overrides": redact(" ".join(overrides)), "sweep.dir": config.hydra.sweep.dir})
            self.run.log_text(OmegaConf.to_yaml(config.hydra.sweeper), "sweeper.yaml")
        except Exception as exc:  # Hydra would only warn and run the jobs as orphans: stop the sweep instead
            log.error("the sweep's parent run could not be created: %s", redact(f"{type(exc).__name__}: {exc}"))
            self._end("FAILED")
            sys.exit(1)
        os.environ[PARENT_RUN_ENV] = self.run.run_id
        # A sweep that raises never reaches on_multirun_end: end the parent FAILED at exit instead of RUNNING.
        atexit.register(self._end, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")
        failed, jobs = failed_jobs(Path(config.hydra.sweep.dir))
        if self.run is not None:
            self._report(config)
        if not failed:
            self._end("FINISHED")
            return
        message = f"{len(failed)} of {jobs} jobs failed: " + "; ".join(failed)
        log.error("%s", message)
        if self.run is not None:
            self.run.set_tags({"error": message[:5000]})
        self._end("FAILED")
        sys.exit(1)

    def _report(self, config: DictConfig) -> None:
        """The comparison report (sweep/report.py), logged to the parent so the UI shows it beside the runs."""
        from sweep.report import ReportError, build_report
        from trackers.mlflow_tracker import default_uri

        try:
            build_report(
                config.tracker.uri or default_uri(),
                config.tracker.experiment,
                Path(config.hydra.sweep.dir) / "report",
                parent_id=self.run.run_id,
                objective=config.objective.metric,
                direction=config.objective.direction,
            )
        except ReportError as exc:  # e.g. every job failed: the sweep's own status says so
            log.warning("no report for this sweep: %s", exc)

    def _end(self, status: str) -> None:
        if self.run is not None:
            self.run.end(status)
            os.environ.pop(PARENT_RUN_ENV, None)
            self.run = None


def failed_jobs(sweep_dir: Path) -> tuple[list[str], int]:
    """The jobs of this sweep that failed on their config (each left its error in its output directory)."""
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    failed = [
        f"job {d.name}: {(d / JOB_ERROR_FILE).read_text().strip()}" for d in jobs if (d / JOB_ERROR_FILE).is_file()
    ]
    return sorted(failed), len(jobs)
