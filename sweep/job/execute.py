"""One run, the unit Hydra launches: config → model → engine → workload → benchmark → record.

Everything that can reject the config happens before the tracker run starts, so bad input records nothing.
From the moment the run starts, any failure ends it FAILED with the error (trackers.base.Tracker.run).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweep.backends.base import engine_gpus
from sweep.backends.cache import engine_key
from sweep.config.errors import ConfigError
from sweep.config.schema import SLO_KEYS
from sweep.job import held_engine
from sweep.job.artifacts import record_artifacts, run_artifacts, save_locally, shown, write_job_error, write_result
from sweep.job.naming import run_name
from sweep.job.plan import Plan, make_plan, start_engine
from sweep.measure.benchmark import engine_changes_workload, run_benchmark
from sweep.measure.figures import HEADLINE
from sweep.measure.metrics import per_gpu_figures, roofline_figures
from sweep.measure.summary import headline, summary_table, unsteady_figures, workload_header
from sweep.measure.telemetry import device_bandwidth
from sweep.model.source import model_identity
from sweep.workload.timing import RequestTiming
from trackers import PARENT_RUN_ENV, make_tracker
from trackers.store import redact_file

log = logging.getLogger(__name__)

# Set by the sweeper for its jobs: a job then logs its summary table (to the job's log file) instead of printing
# it, so that the console shows the sweeper's one progress line per trial.
SUMMARY_TO_LOG_ENV = "SWEEP_SUMMARY_TO_LOG"


class RecordError(RuntimeError):
    """The tracker refused the finished run's figures; they are safe in the run's output directory."""


# The MLflow UI's default columns beside the headline figures: what tells runs apart.
UI_PARAMS = ["model.name", "backend.name", "engine.dtype", "engine.max_batch_size", "workload.scenario"]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config as run params (the tracker takes user info out of any URI); model.name is the model that
    ran (a local checkpoint's directory, a generated model's random-<shape>), not the name of a preset it overrides."""
    return flatten(OmegaConf.to_container(cfg, resolve=True)) | {"model.name": model_identity(cfg.model)[0]}


@dataclass(frozen=True)
class RunResult:
    """What one run measured and where it went: every figure, the tracker's run id (None with tracker=none), the
    Hydra job's output directory (None in process), whether the engine came from the cache, the plan that ran
    (model, backend, workload, device) and every request's clock."""

    figures: dict[str, float]
    run_id: str | None
    output_dir: Path | None
    cache_hit: bool
    plan: Plan
    timings: list[RequestTiming] = field(repr=False)

    @property
    def objective(self) -> float:
        return self.figures[self.plan.cfg.objective.metric]


def run(cfg: DictConfig, parent_run_id: str | None = None) -> RunResult:
    """Run one configuration end to end: plan, build or reuse the engine, benchmark it, record it."""
    t_start = time.perf_counter()
    keep_open = cfg.reuse_open_engine and in_multirun()
    if not keep_open:
        held_engine.close_held()
    held = held_engine.take(cfg) if keep_open else None
    p = make_plan(cfg, open_backend=held.backend if held else None)
    # Imports torch: after the config's checks.
    from sweep.measure.quality import SCORES_FILE, prepare, reference_ready, save_scores

    if held and not reference_ready(cfg, p.backend, p.model, p.dtype, p.workload, p.cache.root):
        held_engine.close_held()  # the reference loads the unquantized model on the device: never beside an engine
        held = None
        p = make_plan(cfg)

    tracker = make_tracker(cfg.tracker)
    phases = {"phase_prepare_s": time.perf_counter() - t_start}
    tags = {
        "backend": p.backend.name,
        "model": p.model.name,
        "device": p.device,
        "dtype": p.dtype,
        "gpu": p.env.get("gpu_name", "none"),
        "scenario": cfg.workload.scenario,
        **cfg.tracker.tags,
    }
    tracker.set_view(UI_PARAMS, list(HEADLINE))
    with tracker.run(run_name(cfg), tags, parent_run_id) as rec:
        rec.log_params(config_params(cfg) | {"engine.ignored_options": ",".join(p.backend.ignored_options())})
        rec.set_tags({f"env.{k}": v for k, v in p.env.items()})

        # Measured (once per board) before any engine is loaded: one resident skews it (sweep/measure/telemetry.py).
        bandwidth = device_bandwidth(p.cache.root, p.env) if p.device == "cuda" else None
        if bandwidth:
            rec.set_tags({"device_bandwidth.method": bandwidth["method"]})
        # The unquantized reference comes first (or from the cache): it never shares the device with the engine.
        t = time.perf_counter()
        quality, no_quality = prepare(cfg, p.backend, p.model, p.dtype, p.device, p.workload, p.cache.root)
        quality_s = time.perf_counter() - t
        rec.set_tags(quality.tags(p.backend) if quality else {"quality.skipped": no_quality})
        log.info("starting the %s engine for %s on %s (%s)", p.backend.name, p.model.name, p.device, p.dtype)
        started = start_engine(p, held)
        entry = started.entry
        phases.update(phase_build_s=started.build_s, phase_load_s=started.load_s)
        from_cache = entry.hit or started.reused  # a reused engine was built, if at all, by the job that loaded it
        rec.set_tags(
            {
                "engine.cache_hit": from_cache,
                "engine.key": engine_key(p.key_inputs),
                "engine.reused_open": started.reused,
            }
        )
        # What loading cost (compilation, graph capture): paid by the job that loaded the engine, not by one reusing it.
        engine_figures = {} if started.reused else p.backend.engine_figures()
        limit_key = "workload.batch_size" if cfg.workload.batch_size else "engine.max_batch_size"
        if changed := engine_changes_workload(cfg.workload, p.batch_size, limit_key):
            log.warning("%s", changed)
            rec.set_tags({"workload.changed": changed})
        served = False
        try:
            t = time.perf_counter()
            result = run_benchmark(p.backend, p.workload, cfg.workload, p.batch_size, slo_targets(cfg))
            phases["phase_benchmark_s"] = time.perf_counter() - t
            if quality:  # after the timed part, on the same engine
                t = time.perf_counter()
                quality.score(p.backend)
                phases["phase_quality_s"] = quality_s + time.perf_counter() - t
            served = True
        finally:
            if served and keep_open:
                held_engine.hold(cfg, p.backend, entry)
            else:  # an engine that failed may be broken: the next job starts its own
                held_engine.close(p.backend)

        figures = dict(result.figures)
        if quality:
            figures.update(quality.figures())
        figures["build_time_s"] = 0.0 if from_cache else entry.build_time_s
        figures["engine_cache_hit"] = float(from_cache)
        figures.update(engine_figures)
        figures.update(p.sizes)
        if p.device == "cuda":  # CPU ranks are processes sharing one host, not devices of their own
            figures.update(per_gpu_figures(figures, engine_gpus(cfg.engine)))
        if bandwidth and "tpot_ms_p50" in figures:
            mean_context = sum(r.input_len + r.output_len / 2 for r in p.workload.measured) / len(p.workload.measured)
            figures["device_bandwidth_gb_s"] = bandwidth["bytes_per_s"] / 1e9
            figures["device_bandwidth_spread_pct"] = bandwidth["spread_pct"]
            figures.update(
                roofline_figures(
                    p.sizes,
                    p.model.shape.vocab_size,
                    p.batch_size,
                    mean_context,
                    bandwidth["bytes_per_s"],
                    figures["tpot_ms_p50"] / 1e3,
                    tp_size=cfg.engine.tp_size,
                )
            )
        if cfg.objective.metric not in figures:  # make_plan refuses what it can foresee; never record without it
            raise RuntimeError(f"objective.metric={cfg.objective.metric!r} was not recorded by this run")
        saturated = is_saturated(figures)
        if saturated is not None:
            rec.set_tags({"saturated": saturated})
        t = time.perf_counter()
        out = job_output_dir()
        artifacts = run_artifacts(cfg, p, entry, figures, result.timings)
        if out is not None:  # first on local disk, so a tracker that fails now loses nothing
            save_locally(out, artifacts, figures)
            if quality:  # the engine's log-probabilities, beside the cached reference's: the figures' inputs
                save_scores(out / SCORES_FILE, quality.scores)
        try:
            record_artifacts(rec, artifacts, entry, hydra_log_file())
            phases["phase_record_s"] = time.perf_counter() - t
            figures.update(phases)
            rec.log_metrics(figures)
        except Exception as exc:
            if out is None:  # no output directory (an in-process run): the figures survive on the console
                print(summary_table("not recorded", figures))
            else:
                write_result(out, figures, rec.run_id)
            where = f"its figures and artifacts are in {out}" if out else "its figures are printed above"
            raise RecordError(f"the tracker refused the finished run ({type(exc).__name__}: {exc}); {where}") from exc
        if unsteady := unsteady_figures(figures):
            rec.set_tags({"figures.unsteady": ",".join(unsteady)})
        if out is not None:  # a sweeper reads every figure of a job from here, with its run's id
            write_result(out, figures, rec.run_id)
        title = (
            f"{p.model.name} · {p.backend.name} · {p.device} ({p.dtype}) · batch {p.batch_size}\n"
            + workload_header(cfg.workload, p.workload.measured, p.batch_size, figures)
        )
        table = summary_table(title, figures)
        if os.environ.get(SUMMARY_TO_LOG_ENV):  # in a search: the sweeper prints one line per trial instead
            log.info("%s", table)
        else:
            print(table)
        warnings = [changed] if changed else []
        if compiled := figures.get("graphs_compiled_while_timed"):
            warnings.append(
                f"{compiled:.0f} graphs compiled while timed: requests waited for torch.compile, so the figures "
                "include compile time (the warm-up did not run every shape the timed part ran)"
            )
            log.warning("%s", warnings[-1])
            rec.set_tags({"figures.compiled_while_timed": f"{compiled:.0f}"})
        if saturated:
            warnings.append(
                f"saturated: workload.request_rate={cfg.workload.request_rate:g} offered "
                f"{figures['offered_rate_req_s']:.2f} req/s and the engine admitted "
                f"{figures['achieved_rate_req_s']:.2f} (below {SATURATION:.0%}): its queue grew, so this measures "
                "the rate the engine sustains, not the one asked for"
            )
            log.warning("%s", warnings[-1])
        # A run's page shows the first lines of its Description: what ran, its headline figures and what changed
        # the workload come first, then the table printed above.
        description = [title.replace("\n", "  \n"), "", headline(figures, cfg.objective.metric), ""]
        description += [f"**warning**: {w}  " for w in warnings] + ["", "```", table, "```"]
        rec.set_description("\n".join(description))
    if rec.run_id:
        command = tracker.ui_command()
        print(f"run {rec.run_id}: {tracker.run_url(rec.run_id)}" + (f"  (after: {command})" if command else ""))
    return RunResult(figures, rec.run_id, out, from_cache, p, result.timings)


SATURATION = 0.95  # an open-loop run whose achieved rate falls below this share of the offered rate is saturated


def is_saturated(figures: dict[str, float]) -> bool | None:
    """None where the run had no offered rate (closed loop, or everything at t0)."""
    if "offered_rate_req_s" not in figures:
        return None
    return figures["achieved_rate_req_s"] < SATURATION * figures["offered_rate_req_s"]


def slo_targets(cfg: DictConfig) -> dict[str, float]:
    return {key: float(cfg.slo[key]) for key in SLO_KEYS if cfg.slo[key] is not None}


def job_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def hydra_log_file() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    out = job_output_dir()
    return out / f"{HydraConfig.get().job.name}.log" if out else None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def redact_hydra_files() -> None:
    """Hydra wrote the job's config and overrides (.hydra/), and a sweep's multirun.yaml, before the task started:
    take user info out of their URIs."""
    out = job_output_dir()
    for file in [*(out / ".hydra").glob("*.yaml"), out.parent / "multirun.yaml"] if out else ():
        redact_file(file)


def refuse_search_without_multirun() -> None:
    """`python -m sweep search=throughput` without -m would run one job and exit 0: say what was meant."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.RUN and "optuna" in str(hydra_cfg.sweeper.get("_target_", "")):
        preset = hydra_cfg.runtime.choices.get("search")
        given = f"search={preset}" if preset else "hydra/sweeper=optuna"
        raise ConfigError(
            f"{given} sets up a search, which runs only in multirun mode; add -m: python -m sweep -m {given} ..."
        )


def main(cfg: DictConfig) -> float:
    """The Hydra task. A config error prints its message and exits 2, with nothing built or recorded; in a
    multirun it fails that job only (a FAILED run with the error), and the sweep exits non-zero at its end."""
    redact_hydra_files()
    try:
        refuse_search_without_multirun()
        return run(cfg, parent_run_id=os.environ.get(PARENT_RUN_ENV)).figures[cfg.objective.metric]
    except ConfigError as exc:
        log.error("%s", exc)
        if not in_multirun():
            sys.exit(2)
        record_failed_job(cfg, exc)
        return float("nan")
    except KeyboardInterrupt as exc:  # the CLI prints one line for it, with what this job kept
        if (out := job_output_dir()) is not None:
            exc.add_note(f"its log and config are in {shown(out)}/")
        raise


def record_failed_job(cfg: DictConfig, exc: ConfigError) -> None:
    out = job_output_dir()
    write_job_error(out, str(exc))
    try:
        tracker = make_tracker(cfg.tracker)
        tags = {"config_error": "true", **cfg.tracker.tags}
        with tracker.run(run_name(cfg), tags, os.environ.get(PARENT_RUN_ENV)) as rec:
            rec.log_params(config_params(cfg))
            raise exc
    except ConfigError:
        pass  # recorded FAILED with the error
    except Exception as record_exc:  # the tracker itself is what is wrong: the job's error file says why
        log.error("this job's failure could not be recorded: %s", record_exc)
