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
from sweep.engine_cache import CacheEntry, engine_key
from sweep.errors import ConfigError
from sweep.figures import HEADLINE
from sweep.metrics import roofline_efficiency
from sweep.plan import Plan, make_plan, start_engine
from sweep.summary import summary_table, unsteady_figures
from sweep.sweeper_api import SWEPT_KEYS_ENV, TRIAL_TAG, write_result
from sweep.telemetry import device_bandwidth
from trackers import PARENT_RUN_ENV, make_tracker

log = logging.getLogger(__name__)

# The MLflow UI's default columns beside the headline figures: what tells runs apart.
UI_PARAMS = ["model.name", "backend.name", "engine.dtype", "engine.max_batch_size", "workload.scenario"]
# Keys that never name a run: where it is recorded, and the sweeper's own settings and presets.
UNNAMED_KEYS = ("tracker", "hydra", "search", "model", "backend")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


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
        "dtype": p.dtype,
        "gpu": p.env.get("gpu_name", "none"),
        "scenario": cfg.workload.scenario,
        **cfg.tracker.tags,
    }
    tracker.set_view(UI_PARAMS, list(HEADLINE))
    with tracker.run(run_name(cfg, p), tags, parent_run_id) as rec:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        rec.log_params(flatten(resolved) | {"engine.ignored_options": ",".join(p.backend.ignored_options())})
        rec.set_tags({f"env.{k}": v for k, v in p.env.items()})

        log.info("starting the %s engine for %s on %s (%s)", p.backend.name, p.model.name, p.device, p.dtype)
        started = start_engine(p)
        entry = started.entry
        phases.update(phase_build_s=started.build_s, phase_load_s=started.load_s)
        rec.set_tags({"engine.cache_hit": entry.hit, "engine.key": engine_key(p.key_inputs)})
        engine_figures = p.backend.engine_figures()
        try:
            t = time.perf_counter()
            result = run_benchmark(p.backend, p.workload, cfg.workload, p.batch_size)
            phases["phase_benchmark_s"] = time.perf_counter() - t
        finally:
            p.backend.close()

        figures = dict(result.figures)
        figures["build_time_s"] = 0.0 if entry.hit else entry.build_time_s
        figures["engine_cache_hit"] = float(entry.hit)
        figures.update(engine_figures)
        figures.update(p.sizes)
        if p.device == "cuda" and "tpot_ms_p50" in figures:
            mean_context = sum(r.input_len + r.output_len / 2 for r in p.workload.measured) / len(p.workload.measured)
            bandwidth = device_bandwidth(p.cache.root, p.env["gpu_name"])
            figures["device_bandwidth_gb_s"] = bandwidth / 1e9
            figures.update(
                roofline_efficiency(
                    figures["model_bytes"],
                    figures["kv_bytes_per_token"],
                    p.batch_size,
                    mean_context,
                    bandwidth,
                    figures["tpot_ms_p50"] / 1e3,
                )
            )
        t = time.perf_counter()
        record_artifacts(rec, cfg, p, entry, figures, result.timings)
        phases["phase_record_s"] = time.perf_counter() - t
        figures.update(phases)
        rec.log_metrics(figures)
        if unsteady := unsteady_figures(figures):
            rec.set_tags({"figures.unsteady": ",".join(unsteady)})
        if (out := job_output_dir()) is not None:  # a sweeper reads every figure of a job from here
            write_result(out, figures)
        title = (
            f"{p.model.name} · {p.backend.name} · {p.device} ({p.dtype}) · {cfg.workload.scenario} · "
            f"batch {p.batch_size}"
        )
        print(summary_table(title, figures))
    if rec.run_id:
        command = tracker.ui_command()
        print(f"run {rec.run_id}: {tracker.run_url(rec.run_id)}" + (f"  (after: {command})" if command else ""))
    return figures[cfg.objective.metric]


def run_name(cfg: DictConfig, p: Plan) -> str:
    """What the run is: model, backend and the settings that vary across its sweep (given alone: on its command
    line), e.g. `trial 3: tiny/hf max_batch_size=4 attn_implementation=sdpa`. tracker.run_name overrides it."""
    if cfg.tracker.run_name:
        return cfg.tracker.run_name
    swept = os.environ.get(SWEPT_KEYS_ENV)
    keys = swept.split(",") if swept is not None else command_line_keys()
    settings = [setting(cfg, key) for key in keys if key and key.split(".")[0].split("/")[0] not in UNNAMED_KEYS]
    name = " ".join([f"{p.model.name}/{p.backend.name}", *filter(None, settings)])
    trial = cfg.tracker.tags.get(TRIAL_TAG)
    return f"trial {trial}: {name}" if trial is not None else name


def command_line_keys() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [item.split("=", 1)[0].lstrip("+~") for item in HydraConfig.get().overrides.task]


def setting(cfg: DictConfig, key: str) -> str | None:
    """`engine.max_batch_size` -> 'max_batch_size=4'; a config group (`workload`) -> its option ('throughput')."""
    from hydra.core.hydra_config import HydraConfig

    value = OmegaConf.select(cfg, key)
    if isinstance(value, DictConfig) or (value is None and "." not in key):
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        return choices.get(key)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def record_artifacts(rec: Any, cfg: DictConfig, p: Plan, entry: CacheEntry, figures: dict, timings: list) -> None:
    manifest = entry.manifest

    rec.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    rec.log_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), "engine/manifest.json")
    results = {
        "figures": figures,
        "environment": p.env,
        "engine": {"key": manifest.get("key"), "ignored_options": p.backend.ignored_options()},
        "model": {"name": p.model.name, "path": str(p.model.path), **p.model.identity},
    }
    rec.log_text(json.dumps(results, indent=2, sort_keys=True, default=str), "results.json")
    rec.log_text(requests_csv(timings), "requests.csv")
    log_file = hydra_log_file()
    if log_file and log_file.is_file():
        rec.log_artifact(log_file, "logs")
    if (entry.path / "build.log").is_file():
        rec.log_artifact(entry.path / "build.log", "engine")


def requests_csv(timings: list) -> str:
    """The per-request table (pandas would cost most of a second to import, for one CSV)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["iteration", "request_id", "input_len", "output_len", "ttft_ms", "tpot_ms", "e2e_latency_ms"])
    for t in timings:
        tpot = "" if t.tpot is None else t.tpot * 1e3
        writer.writerow([t.iteration, t.request_id, t.input_len, len(t.token_times), t.ttft * 1e3, tpot, t.e2e * 1e3])
    return out.getvalue()


def job_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def hydra_log_file() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    out = job_output_dir()
    return out / f"{HydraConfig.get().job.name}.log" if out else None


def main(cfg: DictConfig) -> float:
    """The Hydra task: a config error prints its message and exits 2, with nothing built or recorded."""
    try:
        return execute(cfg, parent_run_id=os.environ.get(PARENT_RUN_ENV))
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
