"""Experiment trackers: where a run's params, metrics, tags and artifacts go."""

from __future__ import annotations

from typing import Any

from trackers.base import TrackedRun, Tracker

# Set by the multirun callback (sweep/multirun/callback.py): every job of a sweep becomes a child of this run.
PARENT_RUN_ENV = "SWEEP_PARENT_RUN_ID"


def make_tracker(tracker_cfg: Any) -> Tracker:
    if tracker_cfg.name == "none":
        from trackers.none import NoTracker

        return NoTracker()
    from trackers.mlflow_tracker import MLflowTracker

    return MLflowTracker(tracker_cfg.uri, tracker_cfg.experiment)


__all__ = ["PARENT_RUN_ENV", "TrackedRun", "Tracker", "make_tracker"]
