"""hydra.sweeper.budget_minutes, and the wall, job and GPU minutes a search spent."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Budget:
    """hydra.sweeper.budget_minutes: no batch is asked for once the next one would likely pass it."""

    def __init__(self, minutes: float | None, device: str, gpus_per_trial: int = 1):
        self.limit_s = None if minutes is None else minutes * 60
        self.device, self.gpus_per_trial = device, gpus_per_trial
        self.started = time.monotonic()
        self.batch_s = 0.0  # wall time of the launched batches: builds, loads and benchmarks
        self.job_s = 0.0  # the same per job: each job of a batch holds its slot (and its GPUs) until the batch ends
        self.batches = 0
        self.stopped = False

    def spent(self, seconds: float, jobs: int = 1) -> None:
        self.batch_s += seconds
        self.job_s += seconds * jobs
        self.batches += 1

    def allows_another_batch(self) -> bool:
        if self.limit_s is None or not self.batches:
            return True
        elapsed = time.monotonic() - self.started
        next_batch = self.batch_s / self.batches
        if elapsed + next_batch <= self.limit_s:
            return True
        self.stopped = True
        log.info(
            "budget: stopping after %.1f of %.1f minutes; the next batch would take about %.1f more",
            elapsed / 60,
            self.limit_s / 60,
            next_batch / 60,
        )
        return False

    def figures(self, job_s: float | None = None) -> dict[str, float]:
        """Wall minutes of this process; job minutes of `job_s` (all the session's workers) or else its own jobs."""
        job_minutes = (self.job_s if job_s is None else job_s) / 60
        return {
            "sweep.wall_minutes": (time.monotonic() - self.started) / 60,
            "sweep.job_minutes": job_minutes,
            # gpus_per_trial GPUs per job on a CUDA run, held for the whole job (build, load and benchmark)
            "sweep.gpu_minutes": job_minutes * self.gpus_per_trial if self.device == "cuda" else 0.0,
        }
