"""The max-rate search: probe offered rates, each probe a Hydra job and an MLflow child run of the sweep's parent.

Doubling from `start_rate` until SLO attainment falls below the target brackets the capacity; bisection narrows
the bracket until it is within `tolerance` of its top, or the probe budget is spent. The answer is the highest
probed rate that met the target, logged on the parent run as `max_sustainable_rate_req_s`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sweep.multirun import sweeper_api

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    rate: float
    attainment: float
    sustained: bool


def next_rate(probes: list[Probe], start_rate: float, tolerance: float, max_rate: float) -> float | None:
    """The next rate to offer, or None when the answer is known to within `tolerance` (or cannot improve)."""
    if not probes:
        return start_rate
    sustained = [p.rate for p in probes if p.sustained]
    broken = [p.rate for p in probes if not p.sustained]
    low = max(sustained) if sustained else None
    high = min(broken) if broken else None
    if high is None:  # everything so far held: double, up to max_rate
        return None if low >= max_rate else min(2 * low, max_rate)
    if low is None:  # even the lowest rate broke the SLO: halve, but not forever
        return None if high <= start_rate / 1024 else high / 2
    if (high - low) / high <= tolerance:
        return None
    return (low + high) / 2


def max_sustainable(probes: list[Probe]) -> float:
    return max((p.rate for p in probes if p.sustained), default=0.0)


class MaxRateSearch:
    def __init__(self, start_rate: float, attainment: float, tolerance: float, max_probes: int, max_rate: float):
        for key, value, ok, allowed in (
            ("start_rate", start_rate, 0 < start_rate < math.inf, "a finite number > 0"),
            ("attainment", attainment, 0 < attainment <= 100, "in (0, 100]"),
            ("tolerance", tolerance, 0 < tolerance < 1, "in (0, 1)"),
            ("max_probes", max_probes, max_probes >= 1, ">= 1"),
            ("max_rate", max_rate, start_rate <= max_rate < math.inf, "finite and >= start_rate"),
        ):
            if not ok:
                raise CompactHydraException(f"hydra.sweeper.{key}={value!r} is not allowed; it must be {allowed}")
        self.start_rate, self.attainment, self.tolerance = start_rate, attainment, tolerance
        self.max_probes, self.max_rate = max_probes, max_rate

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        swept = [a for a in arguments if "," in a.split("=", 1)[-1] or "(" in a.split("=", 1)[-1]]
        if swept:
            raise CompactHydraException(
                f"hydra/sweeper=max_rate searches workload.request_rate itself; fix every other value ({swept[0]!r})"
            )
        probes: list[Probe] = []
        returns = []
        while len(probes) < self.max_probes:
            rate = next_rate(probes, self.start_rate, self.tolerance, self.max_rate)
            if rate is None:
                break
            probe_tag = f"+tracker.tags.{sweeper_api.PROBE_TAG}={len(probes) + 1}"  # names its run `probe N: rate=`
            overrides = [*arguments, "workload.scenario=rate", f"workload.request_rate={rate:.6g}", probe_tag]
            (ret,) = self.launcher.launch([overrides], initial_job_idx=len(probes))
            returns.append(ret)
            if ret.status != JobStatus.COMPLETED:
                raise RuntimeError(f"the probe at {rate:.6g} req/s failed: {ret._return_value}")
            figures = sweeper_api.read_result(Path(ret.hydra_cfg.hydra.runtime.output_dir)).figures
            probe = Probe(rate, figures["slo_attainment_pct"], figures["slo_attainment_pct"] >= self.attainment)
            probes.append(probe)
            log.info(
                "probe %d: %.4g req/s offered, SLO attainment %.1f%% (target %.1f%%): %s",
                len(probes),
                rate,
                probe.attainment,
                self.attainment,
                "sustained" if probe.sustained else "broken",
            )
        answer = max_sustainable(probes)
        log.info("max sustainable rate: %.4g req/s (%d probes)", answer, len(probes))
        self.record(probes, answer)
        return [returns]

    def record(self, probes: list[Probe], answer: float) -> None:
        opened = sweeper_api.parent_run(self.config)
        if opened is None:
            return
        _, parent = opened
        parent.set_tags({"sweep.kind": "max_rate"})
        parent.log_params(
            {
                "max_rate.attainment_pct": self.attainment,
                "max_rate.tolerance": self.tolerance,
                "max_rate.start_rate": self.start_rate,
                "max_rate.max_probes": self.max_probes,
            }
        )
        parent.log_metrics({"max_sustainable_rate_req_s": answer, "max_rate.probes": len(probes)})
        rows = ["rate_req_s,slo_attainment_pct,sustained"] + [
            f"{p.rate:.6g},{p.attainment:.3f},{p.sustained}" for p in probes
        ]
        parent.log_text("\n".join(rows) + "\n", "max_rate_probes.csv")
