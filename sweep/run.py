"""One run, the unit Hydra launches: config → model → engine → workload → benchmark → record.

Everything that can reject the config happens before the tracker run starts, so bad input records nothing.
From the moment the run starts, any failure ends it FAILED with the error (trackers.base.Tracker.run).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweep.benchmark import run_benchmark
from sweep.config import SLO_KEYS
from sweep.engine_cache import CacheEntry, engine_key
from sweep.errors import ConfigError
from sweep.metrics import RequestTiming, roofline_figures
from sweep.plan import Plan, make_plan, start_engine
from sweep.summary import summary_table
from sweep.sweeper_api import write_result
from sweep.telemetry import device_bandwidth
from trackers import PARENT_RUN_ENV, make_tracker
from trackers.store import redact, redact_file

log = logging.getLogger(__name__)

JOB_ERROR_FILE = "error.txt"  # in a multirun job's output directory: why the job failed (counted by sweep/multirun.py)


class RecordError(RuntimeError):
    """The tracker refused the finished run's figures; they are safe in the run's output directory."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The flattened config as run params, with user info taken out of any URI."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: redact(v) if isinstance(v, str) else v for k, v in params.items()}


def execute(cfg: DictConfig, parent_run_id: str | None = None) -> float:
    """Run one configuration end to end; return the objective's value."""
    t_start = time.perf_counter()
    p = make_plan(cfg)
    tracker = make_tracker(cfg.tracker)
    phases = {"phase_prepare_s": time.perf_counter() - t_start}
    tags = {
        "backend": p.backend.name,
        "model": p.model.name,
        "device": p.device,
        "gpu": p.env.get("gpu_name", "none"),
        "scenario": cfg.workload.scenario,
        "sweep.git_commit": p.env.get("sweep_git_commit"),
        **{k: redact(str(v)) for k, v in cfg.tracker.tags.items()},
    }
    with tracker.run(cfg.tracker.run_name, tags, parent_run_id) as rec:
        rec.log_params(config_params(cfg) | {"engine.ignored_options": ",".join(p.backend.ignored_options())})
        rec.set_tags({f"env.{k}": v for k, v in p.env.items()})

        # Measured (once per board) before any engine is loaded: one resident skews it (sweep/telemetry.py).
        bandwidth = device_bandwidth(p.cache.root, p.env) if p.device == "cuda" else None
        if bandwidth:
            rec.set_tags({"device_bandwidth.method": bandwidth["method"]})
        log.info("starting the %s engine for %s on %s (%s)", p.backend.name, p.model.name, p.device, p.dtype)
        started = start_engine(p)
        entry = started.entry
        phases.update(phase_build_s=started.build_s, phase_load_s=started.load_s)
        rec.set_tags({"engine.cache_hit": entry.hit, "engine.key": engine_key(p.key_inputs)})
        engine_figures = p.backend.engine_figures()
        try:
            t = time.perf_counter()
            result = run_benchmark(p.backend, p.workload, cfg.workload, p.batch_size, slo_targets(cfg))
            phases["phase_benchmark_s"] = time.perf_counter() - t
        finally:
            p.backend.close()

        figures = dict(result.figures)
        figures["build_time_s"] = 0.0 if entry.hit else entry.build_time_s
        figures["engine_cache_hit"] = float(entry.hit)
        figures.update(engine_figures)
        figures.update(p.sizes)
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
        try:
            record_artifacts(rec, artifacts, entry)
            phases["phase_record_s"] = time.perf_counter() - t
            figures.update(phases)
            rec.log_metrics(figures)
        except Exception as exc:
            if out is None:  # no output directory (an in-process run): the figures survive on the console
                print(summary_table("not recorded", figures))
            where = f"its figures and artifacts are in {out}" if out else "its figures are printed above"
            raise RecordError(f"the tracker refused the finished run ({type(exc).__name__}: {exc}); {where}") from exc
        if out is not None:  # a sweeper reads every figure of a job from here
            write_result(out, figures)
        title = (
            f"{p.model.name} · {p.backend.name} · {p.device} ({p.dtype}) · {cfg.workload.scenario} · "
            f"batch {p.batch_size}"
        )
        print(summary_table(title, figures))
        if saturated:
            print(
                f"saturated: the engine admitted {figures['achieved_rate_req_s']:.2f} req/s of the "
                f"{figures['offered_rate_req_s']:.2f} req/s offered (below {SATURATION:.0%}); its queue grew"
            )
    return figures[cfg.objective.metric]


SATURATION = 0.95  # an open-loop run whose achieved rate falls below this share of the offered rate is saturated


def is_saturated(figures: dict[str, float]) -> bool | None:
    """None where the run had no offered rate (closed loop, or everything at t0)."""
    if "offered_rate_req_s" not in figures:
        return None
    return figures["achieved_rate_req_s"] < SATURATION * figures["offered_rate_req_s"]


def slo_targets(cfg: DictConfig) -> dict[str, float]:
    return {key: float(cfg.slo[key]) for key in SLO_KEYS if cfg.slo[key] is not None}


def run_artifacts(cfg: DictConfig, p: Plan, entry: CacheEntry, figures: dict, timings: list) -> dict[str, str]:
    """The run's text artifacts by their path in the run: config.yaml, engine/manifest.json, results.json, ..."""
    manifest = entry.manifest
    results = {
        "figures": figures,
        "environment": p.env,
        "engine": {"key": manifest.get("key"), "ignored_options": p.backend.ignored_options()},
        "model": {"name": p.model.name, "path": str(p.model.path), **p.model.identity},
    }
    return {
        "config.yaml": redact(OmegaConf.to_yaml(cfg, resolve=True)),
        "engine/manifest.json": json.dumps(manifest, indent=2, sort_keys=True, default=str),
        "results.json": json.dumps(results, indent=2, sort_keys=True, default=str),
        "requests.csv": requests_csv(timings),
        "token_times.jsonl": token_times_jsonl(timings),
    }


def save_locally(out: Path, artifacts: dict[str, str], figures: dict) -> None:
    for name, text in artifacts.items():
        (out / "artifacts" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "artifacts" / name).write_text(text)
    write_result(out, figures)


def record_artifacts(rec: Any, artifacts: dict[str, str], entry: CacheEntry) -> None:
    for name, text in artifacts.items():
        rec.log_text(text, name)
    log_file = hydra_log_file()
    if log_file and log_file.is_file():
        rec.log_artifact(log_file, "logs")
    if (entry.path / "build.log").is_file():
        rec.log_artifact(entry.path / "build.log", "engine")


REQUEST_COLUMNS = (
    "iteration",
    "request_id",
    "input_len",
    "output_len",
    "arrival_s",
    "admitted_s",
    "first_token_s",
    "finish_s",
    "queue_ms",
    "ttft_ms",
    "tpot_ms",
    "e2e_latency_ms",
)


def requests_csv(timings: list[RequestTiming]) -> str:
    """The per-request table; times in seconds from the iteration's start (pandas would cost most of a second to
    import, for one CSV)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(REQUEST_COLUMNS)
    for t in timings:
        admitted = "" if t.admitted is None else t.admitted - t.t0
        queue = "" if t.queue is None else t.queue * 1e3
        tpot = "" if t.tpot is None else t.tpot * 1e3
        writer.writerow(
            [
                t.iteration,
                t.request_id,
                t.input_len,
                len(t.token_times),
                t.arrival - t.t0,
                admitted,
                t.token_times[0] - t.t0,
                t.token_times[-1] - t.t0,
                queue,
                t.ttft * 1e3,
                tpot,
                t.e2e * 1e3,
            ]
        )
    return out.getvalue()


def token_times_jsonl(timings: list[RequestTiming]) -> str:
    """Every output token's host time, in seconds from its iteration's start, one request per line."""
    return "".join(
        json.dumps(
            {"iteration": t.iteration, "request_id": t.request_id, "token_times_s": [x - t.t0 for x in t.token_times]}
        )
        + "\n"
        for t in timings
    )


def timings_from_artifacts(requests_text: str, token_times_text: str) -> list[RequestTiming]:
    """The run's requests rebuilt from its two artifacts (each iteration's start at 0): every figure the run
    logged can be recomputed from these with sweep.metrics."""
    tokens = {}
    for line in token_times_text.splitlines():
        row = json.loads(line)
        tokens[(row["iteration"], row["request_id"])] = row["token_times_s"]
    timings = []
    for row in csv.DictReader(io.StringIO(requests_text)):
        iteration = int(row["iteration"])
        timings.append(
            RequestTiming(
                row["request_id"],
                int(row["input_len"]),
                int(row["output_len"]),
                float(row["arrival_s"]),
                tokens[(iteration, row["request_id"])],
                iteration,
                admitted=float(row["admitted_s"]) if row["admitted_s"] else None,
            )
        )
    return timings


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


def main(cfg: DictConfig) -> float:
    """The Hydra task. A config error prints its message and exits 2, with nothing built or recorded; in a
    multirun it fails that job only (a FAILED run with the error), and the sweep exits non-zero at its end."""
    redact_hydra_files()
    try:
        return execute(cfg, parent_run_id=os.environ.get(PARENT_RUN_ENV))
    except ConfigError as exc:
        log.error("%s", exc)
        if not in_multirun():
            sys.exit(2)
        record_failed_job(cfg, exc)
        return float("nan")


def record_failed_job(cfg: DictConfig, exc: ConfigError) -> None:
    out = job_output_dir()
    (out / JOB_ERROR_FILE).write_text(f"{exc}\n")
    write_result(out, {})  # a sweeper finds no figure, so the trial fails too
    try:
        tracker = make_tracker(cfg.tracker)
        tags = {"config_error": "true", **{k: redact(str(v)) for k, v in cfg.tracker.tags.items()}}
        with tracker.run(cfg.tracker.run_name, tags, os.environ.get(PARENT_RUN_ENV)) as rec:
            rec.log_params(config_params(cfg))
            raise exc
    except ConfigError:
        pass  # recorded FAILED with the error
    except Exception as record_exc:  # the tracker itself is what is wrong: the job's error file says why
        log.error("this job's failure could not be recorded: %s", record_exc)
