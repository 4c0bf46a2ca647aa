"""Experiment trackers: where a run's params, metrics, tags and artifacts go."""
from __future__ import annotations

from typing import Any

from trackers.base import TrackedRun, Tracker


def make_tracker(tracker_cfg: Any) -> Tracker:
    if tracker_cfg.name == "none":
        from trackers.none import NoTracker

        return NoTracker()
    from trackers.mlflow_tracker import MLflowTracker

    return MLflowTracker(tracker_cfg.uri, tracker_cfg.experiment)


__all__ = ["TrackedRun", "Tracker", "make_tracker"]
