"""A tracker that records nothing: for dry runs (`tracker=none`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trackers.base import TrackedRun, Tracker


class NoRun(TrackedRun):
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class NoTracker(Tracker):
    def start_run(
        self, name: str | None, tags: dict[str, Any], parent_run_id: str | None = None, owned: bool = True
    ) -> TrackedRun:
        return NoRun()

    def attach(self, run_id: str) -> TrackedRun:
        return NoRun()
