"""The tracker interface: a run is a context that ends FINISHED, FAILED (with its error) or KILLED."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class TrackedRun(ABC):
    run_id: str | None = None

    @abstractmethod
    def log_params(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float]) -> None: ...

    @abstractmethod
    def set_tags(self, tags: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: ...

    @abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None: ...

    @abstractmethod
    def end(self, status: str) -> None: ...

    def set_description(self, markdown: str) -> None:
        """What a UI shows at the top of the run's page (a tracker without a UI ignores it)."""


class Tracker(ABC):
    @abstractmethod
    def start_run(
        self, name: str | None, tags: dict[str, Any], parent_run_id: str | None = None, owned: bool = True
    ) -> TrackedRun:
        """A new run. An owned run belongs to this process: when the process is gone, a later start ends it KILLED.
        A run several processes share (a study's parent, which its workers take turns to keep) is not owned."""

    @abstractmethod
    def attach(self, run_id: str) -> TrackedRun:
        """A run another process started (a sweep's parent), to log into."""

    def fail_runs(self, tags: dict[str, Any], error: str) -> None:
        """End FAILED, saying why, every run carrying all these tags that is not FAILED yet (the run of a trial whose
        worker died, left RUNNING or ended KILLED). A tracker that keeps nothing has none."""

    def set_view(self, params: list[str], metrics: list[str]) -> None:
        """Columns a UI shows for the experiment's runs by default (a tracker without a UI ignores it)."""

    def run_url(self, run_id: str) -> str | None:
        """Where a person opens the run, or None."""
        return None

    def ui_command(self) -> str | None:
        """The command that serves the UI behind run_url, when none serves it already."""
        return None

    @contextlib.contextmanager
    def run(self, name: str | None, tags: dict[str, Any], parent_run_id: str | None = None) -> Iterator[TrackedRun]:
        """A run that can never stay RUNNING: an exception ends it FAILED with the error, Ctrl-C ends it KILLED."""
        run = self.start_run(name, tags, parent_run_id)
        try:
            yield run
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
            # When the store itself is what failed, these may fail too: say so, and keep the run's own error.
            try:
                run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
                if status == "FAILED":  # the page of a failed run opens on why
                    run.set_description(f"**{status}**: {type(exc).__name__}: {exc}")
            except Exception as tag_exc:
                log.error("run %s: its error could not be recorded: %s", run.run_id, tag_exc)
            try:
                run.end(status)
                if status == "KILLED" and run.run_id:  # the CLI's one line on an interruption names it
                    exc.add_note(f"run {run.run_id} ended KILLED")
            except Exception as end_exc:
                log.error("run %s could not be ended %s in the tracker: %s", run.run_id, status, end_exc)
            raise
        run.end("FINISHED")
