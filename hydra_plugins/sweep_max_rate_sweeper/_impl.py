"""The max-rate search: probe offered rates, each probe a Hydra job and an MLflow child run of the sweep's parent.

Doubling from `start_rate` until SLO attainment falls below the target brackets the capacity; bisection narrows
the bracket until it is within `tolerance` of its top, or the probe budget is spent. The answer is the highest
probed rate that met the target, logged on the parent run as `max_sustainable_rate_req_s` beside the lowest rate
that broke it. Every setting, and the first probe's config, is checked before the parent run opens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

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


def lowest_broken(probes: list[Probe]) -> float | None:
    return min((p.rate for p in probes if not p.sustained), default=None)


SETTINGS = ("start_rate", "attainment", "tolerance", "max_probes", "max_rate")


def check_settings(start_rate: float, attainment: float, tolerance: float, max_probes: int, max_rate: float) -> None:
    """Each setting within what it can mean (NaN never is); ConfigError naming the first that is not."""
    for key, value, ok, allowed in (
        ("start_rate", start_rate, 0 < start_rate < math.inf, "a finite number > 0 (requests per second)"),
        ("attainment", attainment, 0 < attainment <= 100, "a percentage in (0, 100]"),
        ("tolerance", tolerance, 0 < tolerance < 1, "a fraction in (0, 1)"),
        ("max_probes", max_probes, max_probes >= 1, "1 or more"),
        (
            "max_rate",
            max_rate,
            start_rate <= max_rate < math.inf,
            f"finite and >= hydra.sweeper.start_rate={start_rate}",
        ),
    ):
        if not ok:
            raise sweeper_api.ConfigError(f"hydra.sweeper.{key}={value!r} is not allowed; it must be {allowed}")


def check_config(config: DictConfig) -> None:
    """Every set-up error of a max-rate search, before its parent run opens (the multirun callback calls it)."""
    if all(config.slo[key] is None for key in sweeper_api.SLO_KEYS):
        raise sweeper_api.ConfigError(
            f"slo={config.slo.name!r} sets no objective, and search=max_rate judges each rate by one; "
            "set slo=interactive or slo=batch, or slo.ttft_ms / slo.tpot_ms / slo.e2e_ms"
        )
    settings = {key: config.hydra.sweeper[key] for key in SETTINGS}
    check_settings(**settings)
    parser = OverridesParser.create()
    swept = [o.input_line for o in parser.parse_overrides(list(config.hydra.overrides.task)) if o.is_sweep_override()]
    if swept:
        raise sweeper_api.ConfigError(
            f"{swept[0]} is not allowed with search=max_rate: it searches workload.request_rate itself; give every "
            "other key one value"
        )
    first_probe = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    first_probe.workload.scenario, first_probe.workload.request_rate = "rate", settings["start_rate"]
    if reason := sweeper_api.infeasible(first_probe):  # the rate changes nothing of this: every probe would fail
        raise sweeper_api.ConfigError(reason)


class MaxRateSearch:
    def __init__(self, start_rate: float, attainment: float, tolerance: float, max_probes: int, max_rate: float):
        check_settings(start_rate, attainment, tolerance, max_probes, max_rate)
        self.start_rate, self.attainment, self.tolerance = start_rate, attainment, tolerance
        self.max_probes, self.max_rate = max_probes, max_rate

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        """Probe until the answer is known; a search stopped early (Ctrl-C, SIGTERM, a probe that failed) records
        the bracket it found so far as a partial answer."""
        probes: list[Probe] = []
        returns = []
        try:
            while len(probes) < self.max_probes:
                rate = next_rate(probes, self.start_rate, self.tolerance, self.max_rate)
                if rate is None:
                    break
                probe_tag = f"+tracker.tags.{sweeper_api.PROBE_TAG}={len(probes) + 1}"  # its run: `probe N: rate=`
                overrides = [*arguments, "workload.scenario=rate", f"workload.request_rate={rate:.6g}", probe_tag]
                (ret,) = self.launcher.launch([overrides], initial_job_idx=len(probes))
                returns.append(ret)
                if ret.status != JobStatus.COMPLETED:
                    raise RuntimeError(f"the probe at {rate:.6g} req/s failed: {ret._return_value}")
                figures = sweeper_api.read_result(Path(ret.hydra_cfg.hydra.runtime.output_dir)).figures
                if "slo_attainment_pct" not in figures:  # its config was refused: the multirun callback says why
                    log.warning("the search stops: the probe at %.6g req/s was refused", rate)
                    self.record(probes, stopped="a probe was refused")
                    return [returns]
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
        except BaseException as exc:
            self.record(probes, stopped=f"{type(exc).__name__}: {exc}")
            raise
        self.record(probes)
        return [returns]

    def record(self, probes: list[Probe], stopped: str | None = None) -> None:
        """The answer (the highest rate that held) and the bracket around it, logged and on the parent run; a
        search stopped early records what it found, tagged partial."""
        answer, broken = max_sustainable(probes), lowest_broken(probes)
        bracket = f"held at {answer:.4g} req/s" if answer else "no rate held"
        bracket += f", broke at {broken:.4g} req/s" if broken is not None else ""
        if stopped:
            log.warning("max-rate search stopped (%s) after %d probes: %s", stopped, len(probes), bracket)
        else:
            log.info("max sustainable rate: %.4g req/s (%d probes; %s)", answer, len(probes), bracket)
        opened = sweeper_api.parent_run(self.config)
        if opened is None:
            return
        _, parent = opened
        parent.set_tags({"sweep.kind": "max_rate", "max_rate.partial": str(bool(stopped)).lower()})
        parent.log_params(
            {
                "max_rate.attainment_pct": self.attainment,
                "max_rate.tolerance": self.tolerance,
                "max_rate.start_rate": self.start_rate,
                "max_rate.max_probes": self.max_probes,
            }
        )
        metrics = {"max_rate.probes": len(probes)}
        if probes:
            metrics["max_sustainable_rate_req_s"] = answer
        if broken is not None:
            metrics["max_rate.lowest_broken_rate_req_s"] = broken
        parent.log_metrics(metrics)
        rows = ["rate_req_s,slo_attainment_pct,sustained"] + [
            f"{p.rate:.6g},{p.attainment:.3f},{p.sustained}" for p in probes
        ]
        parent.log_text("\n".join(rows) + "\n", "max_rate_probes.csv")
