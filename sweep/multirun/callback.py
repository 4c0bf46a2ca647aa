"""A Hydra callback that groups every multirun (a grid or a search) under one MLflow parent run, and reports it.

The parent's id travels to the jobs in $SWEEP_PARENT_RUN_ID, which launchers pass on to their workers.
A sweeper (hydra_plugins/sweep_optuna_sweeper) finds the parent the same way and logs the study into it.

A sweeper class may offer two hooks: `check_config(config)`, every set-up error before anything is recorded, and
`shared_parent_run_id(config, start_parent)`, for a study that several processes work on (workers on several
GPUs or hosts): it returns the parent they share, calling `start_parent()` only when there is none yet. A sweeper
that leaves the parent to other workers sets $SWEEP_PARENT_STAYS_OPEN: this process then neither reports nor
ends it.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from sweep.config.errors import ConfigError
from sweep.job import held_engine
from sweep.job.artifacts import JOB_ERROR_FILE, RESULT_FILE, shown
from sweep.job.execute import UI_PARAMS
from sweep.job.validate import check_sweep
from sweep.measure.figures import HEADLINE, lookup
from sweep.measure.summary import headline
from sweep.multirun.grid import check_grid, is_grid
from sweep.multirun.sweeper_api import PARENT_STAYS_OPEN_ENV, SWEPT_KEYS_ENV
from trackers import PARENT_RUN_ENV, make_tracker
from trackers.store import redact, redact_file

log = logging.getLogger(__name__)


def sweeps(config: DictConfig) -> dict[str, str]:
    """What this multirun varies, key -> sweep: its command line's (`a=1,2`, `choice(...)`) and a search preset's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    found = {o.key_or_group: o.input_line for o in overrides if o.is_sweep_override()}
    preset = config.hydra.sweeper.get("params") or {}
    return found | {k: f"{k}={v}" for k, v in preset.items() if k not in found}


# What running the command again does after an interruption, by sweeper; any other sweeper starts over.
RESUMES = {
    "BasicSweeper": "every point runs again, reusing the engines built",
    "OptunaSweeper": "the study goes on from its finished trials",
    "MaxRateSweeper": "the probes start over, reusing the engines built",
}
# The multirun this process runs, for the CLI to end and describe when Ctrl-C or SIGTERM stops it: Hydra calls no
# callback on an interruption.
RUNNING: list[ParentRunCallback] = []


def end_interrupted(reason: str) -> str | None:
    """The multirun this process was running, ended KILLED: what it kept and how to resume, in one line (None when
    no multirun runs)."""
    return RUNNING.pop().interrupted(reason) if RUNNING else None


def remove_launcher_pickles(config: DictConfig) -> None:
    """submitit pickles each job's function and config, and its result with the config again: with a password in a
    URI, a file would hold it. They serve only while the job runs; the sweep's own files say what each job did."""
    folder = config.hydra.launcher.get("submitit_folder") if "launcher" in config.hydra else None
    if not folder:
        return
    root = Path(str(folder).split("%", 1)[0])  # submitit_folder names each job's folder with %j
    for pickle in root.rglob("*.pkl") if root.is_dir() else ():
        pickle.unlink(missing_ok=True)


class ParentRunCallback(Callback):
    def __init__(self) -> None:
        self.run: Any = None
        self.tracker: Any = None
        self.config: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.config = config
        RUNNING.append(self)
        atexit.register(remove_launcher_pickles, config)  # also when the sweep fails or is interrupted
        sweeper_class = get_class(config.hydra.sweeper._target_)
        # Every multirun's objectives, and the settings of a sweeper that can check its own, are checked now, so
        # that a set-up error records nothing; a grid's points are checked here, every one before the first runs.
        check = getattr(sweeper_class, "check_config", None)
        if is_grid(config):
            check = lambda config: check_grid(config, set(sweeps(config)))
        try:
            check_sweep(config, sweeps(config))
            if check is not None:
                check(config)
        except ConfigError as exc:
            log.error("%s", exc)
            sys.exit(2)
        except Exception as exc:  # e.g. an unreachable storage: Hydra would only warn and run the sweep anyway
            log.error("the sweep could not be set up: %s", redact(f"{type(exc).__name__}: {exc}"))
            sys.exit(1)
        if config.tracker.name == "none" or os.environ.get(PARENT_RUN_ENV):
            return  # nothing to record, or an outer sweep already owns the parent
        share = getattr(sweeper_class, "shared_parent_run_id", None)
        try:
            self.tracker = make_tracker(config.tracker)
            if share is None:
                self._start_parent(config, owned=True)
            else:  # the study's workers share one parent: it outlives the process that happened to start it
                run_id = share(config, lambda: self._start_parent(config, owned=False).run_id)
                self.run = self.run or self.tracker.attach(run_id)
        except ConfigError as exc:
            log.error("%s", exc)
            self._end("FAILED")
            sys.exit(2)
        except Exception as exc:  # Hydra would only warn and run the jobs as orphans: stop the sweep instead
            log.error("the sweep's parent run could not be created: %s", redact(f"{type(exc).__name__}: {exc}"))
            self._end("FAILED")
            sys.exit(1)
        os.environ[PARENT_RUN_ENV] = self.run.run_id
        os.environ[SWEPT_KEYS_ENV] = ",".join(sweeps(config))
        # A sweep that raises never reaches on_multirun_end: end the parent FAILED at exit instead of RUNNING, or
        # KILLED when Ctrl-C or SIGTERM stopped it (interrupted, from the CLI).
        atexit.register(self._end, "FAILED")

    def _start_parent(self, config: DictConfig, owned: bool) -> Any:
        overrides = list(config.hydra.overrides.task)
        sweeper = config.hydra.sweeper._target_.rsplit(".", 1)[-1]
        tags = {"sweep.kind": "multirun", "sweep.sweeper": sweeper}
        kind = "grid" if is_grid(config) else "search"  # a search's sweeper renames it after its study
        swept = sweeps(config)
        name = config.tracker.run_name or f"{kind}: {' '.join(swept.values()) or ' '.join(overrides)}"[:250]
        self.run = self.tracker.start_run(name, tags, owned=owned)  # the tracker takes user info out of URIs
        self.run.log_params({"sweep.overrides": " ".join(overrides), "sweep.dir": config.hydra.sweep.dir})
        self.run.log_text(OmegaConf.to_yaml(config.hydra.sweeper), "sweeper.yaml")
        return self.run

    def interrupted(self, reason: str) -> str:
        """End the parent KILLED with the reason; say what the sweep kept and what running it again does."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()] if sweep_dir.is_dir() else []
        finished = sum((d / RESULT_FILE).is_file() for d in jobs)
        parent = ""
        tracked = self.run is not None
        if tracked:
            parent = f"; sweep run {self.run.run_id} ended KILLED"
            try:
                self.run.set_tags({"error": f"KeyboardInterrupt: {reason}"})
                self._end("KILLED")
            except Exception as exc:  # the store is what failed: the exit handler tries FAILED once more
                parent = f"; its sweep run {self.run.run_id} could not be ended ({type(exc).__name__}: {exc})"
        sweeper = self.config.hydra.sweeper._target_.rsplit(".", 1)[-1]
        resume = RESUMES.get(sweeper, "it starts over")
        records = f"{shown(sweep_dir)}/" + (" and their MLflow runs" if tracked else "")
        return (
            f"{reason}: {finished} of {len(jobs)} started jobs finished{parent}; kept: {records}; "
            f"resume: run the same command again ({resume})"
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        held_engine.close_held()  # the last job's engine, before the report is built
        remove_launcher_pickles(config)
        if self in RUNNING:
            RUNNING.remove(self)
        redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")
        failed, jobs = failed_jobs(Path(config.hydra.sweep.dir))
        stays_open = bool(os.environ.get(PARENT_STAYS_OPEN_ENV))
        message = f"{len(failed)} of {jobs} jobs failed: " + "; ".join(failed) if failed else None
        if self.run is not None:
            report = None if stays_open else self._report(config)
            if not stays_open:
                self._describe(report, message)
            if report is not None and is_grid(config):
                self._summarise_grid(report)  # a search's sweeper logs its own study summary
            run_id = self.run.run_id
            command = self.tracker.ui_command()
            still = "  (still running: the last of its study's workers ends it)" if stays_open else ""
            after = f"  (after: {command})" if command else ""
            print(f"sweep {run_id}: {self.tracker.run_url(run_id)}{still}{after}")
            if report is not None:
                print(f"report: {report.files['comparison.md'].resolve()}")
        if not failed:
            self._end("FINISHED")
            return
        log.error("%s", message)
        if self.run is not None and not stays_open:
            self.run.set_tags({"error": message[:5000]})
        self._end("FAILED")
        sys.exit(1)

    def _report(self, config: DictConfig) -> Any:
        """The comparison report (sweep/report/), logged to the parent so the UI shows it beside the runs."""
        from sweep.report import ReportError, build_report
        from trackers.mlflow_tracker import default_uri

        try:
            return build_report(
                config.tracker.uri or default_uri(),
                config.tracker.experiment,
                Path(config.hydra.sweep.dir) / "report",
                parent_id=self.run.run_id,
                objective=config.objective.metric,
                direction=config.objective.direction,
            )
        except ReportError as exc:  # e.g. every job failed: the sweep's own status says so
            log.warning("no report for this sweep: %s", exc)
            return None

    def _describe(self, report: Any, failures: str | None) -> None:
        """The parent as the runs table and its page show it: the best run's headline figures under the columns'
        names, the values each default column took across the runs, and the comparison table as its Description."""
        lines = [f"**{failures}**", ""] if failures else []
        if report is None:
            self.run.set_description("\n".join(lines + ["no run finished with figures"]))
            return
        best = report.best
        if report.baseline is not None:  # rival set-ups; a load sweep's report leads with its own headline
            lines += [f"best: **{best['tags.mlflow.runName']}**  ", best_line(report), ""]
        self.run.set_description("\n".join(lines) + "\n" + table_first(report.files["comparison.md"].read_text()))
        names = dict.fromkeys([*HEADLINE, report.objective])
        self.run.log_metrics({m: best[f"metrics.{m}"] for m in names if is_figure(best.get(f"metrics.{m}"))})
        covered = {}
        for param in UI_PARAMS:
            values = report.runs.get(f"params.{param}")
            if values is not None and values.notna().any():
                covered[param] = ", ".join(sorted({str(v) for v in values.dropna()}, key=natural))
        try:
            self.run.log_params(covered)
        except Exception as exc:  # a parent another session already filled in (params never change in MLflow)
            log.warning("the sweep's parent run keeps its earlier settings columns: %s", exc)

    def _summarise_grid(self, report: Any) -> None:
        """What a search's parent holds, for a grid: the best run's value and settings, and the run counts."""
        best = report.best
        self.run.log_metrics(
            {f"best.{report.objective}": best[f"metrics.{report.objective}"]}
            | {f"runs.{status.lower()}": n for status, n in report.counts.items()}
        )
        settings = {f"best.{p.removeprefix('params.')}": best[p] for p in report.swept}
        self.run.log_params(settings | {"best.run_id": best["run_id"]})

    def _end(self, status: str) -> None:
        """End the parent, unless the sweeper left it to other workers of its study."""
        if self.run is not None:
            if not os.environ.pop(PARENT_STAYS_OPEN_ENV, None):
                self.run.end(status)
            os.environ.pop(PARENT_RUN_ENV, None)
            os.environ.pop(SWEPT_KEYS_ENV, None)
            self.run = None


def best_line(report: Any) -> str:
    """The best run's headline figures, the objective first, and how it compares with the baseline."""
    figures = {k.removeprefix("metrics."): v for k, v in report.best.items() if k.startswith("metrics.")}
    line = headline({k: v for k, v in figures.items() if is_figure(v)}, report.objective)
    if report.baseline is None:  # a load sweep: its rates are loads on one engine, not rivals
        return line
    base, value = report.baseline[f"metrics.{report.objective}"], report.best[f"metrics.{report.objective}"]
    if report.baseline["run_id"] != report.best["run_id"] and base and value:
        better = lookup(report.objective).better == "higher"
        line += (
            f" ({value / base if better else base / value:.2f}x the baseline, {report.baseline['tags.mlflow.runName']})"
        )
    return line


def table_first(comparison: str) -> str:
    """The comparison report's Markdown with its table first (after its headline, if it has one): a run page shows
    the first lines of a Description and folds the rest. Its title goes (the run's own name says what it is); any
    other layout is kept as it is."""
    sections = [s for s in comparison.strip().split("\n\n") if not s.startswith("# ")]
    table = next((i for i, s in enumerate(sections) if s.startswith("| ")), None)
    if table is None:
        return "\n\n".join(sections)
    headline = sections[:1] if sections[0].startswith("**") else []
    first = headline + sections[max(table - 1, 0) : table + 1]  # how the table is ordered, and the table
    return "\n\n".join(first + [s for s in sections if s not in first]) + "\n"


def is_figure(value: Any) -> bool:
    """A figure worth logging: a number, not a missing cell (NaN or None)."""
    return isinstance(value, (int, float)) and not math.isnan(value)


def natural(text: str) -> tuple:
    """Numbers in their order (2 before 16), then text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def failed_jobs(sweep_dir: Path) -> tuple[list[str], int]:
    """The jobs of this sweep that failed on their config (each left its error in its output directory)."""
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    failed = [
        f"job {d.name}: {(d / JOB_ERROR_FILE).read_text().strip()}" for d in jobs if (d / JOB_ERROR_FILE).is_file()
    ]
    return sorted(failed), len(jobs)
