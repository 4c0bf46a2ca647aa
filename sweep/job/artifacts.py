"""The files a run leaves: the one place that writes and reads them.

In a Hydra job's output directory: `figures.json` (every figure and the run's id, what a sweeper reads back),
`error.txt` (why a job of a multirun was refused) and `artifacts/` (the same text files the tracker records:
config.yaml, engine/manifest.json, results.json, requests.csv, token_times.jsonl).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sweep.backends.cache import CacheEntry
from sweep.workload.timing import RequestTiming
from trackers.store import redact

if TYPE_CHECKING:
    from sweep.job.plan import Plan

RESULT_FILE = "figures.json"
JOB_ERROR_FILE = "error.txt"  # counted by the multirun callback


@dataclass
class JobResult:
    figures: dict[str, float]
    run_id: str | None  # the job's tracker run; None when tracking is off


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def write_result(output_dir: Path, figures: dict[str, float], run_id: str | None = None) -> None:
    (output_dir / RESULT_FILE).write_text(json.dumps({"run_id": run_id, "figures": figures}, indent=2))


def read_result(output_dir: Path) -> JobResult:
    data = json.loads((Path(output_dir) / RESULT_FILE).read_text())
    return JobResult(data["figures"], data["run_id"])


def write_job_error(output_dir: Path, message: str) -> None:
    """A refused job of a multirun: why, and no figure, so that a sweeper fails its trial too."""
    (output_dir / JOB_ERROR_FILE).write_text(f"{message}\n")
    write_result(output_dir, {})


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


def record_artifacts(rec: Any, artifacts: dict[str, str], entry: CacheEntry, log_file: Path | None) -> None:
    for name, text in artifacts.items():
        rec.log_text(text, name)
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
    logged can be recomputed from these with sweep.measure.metrics."""
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
