"""MLflow tracker. Default store: SQLite at <cwd>/mlruns/mlflow.db, artifacts under <cwd>/mlruns/artifacts.

The file store is deprecated and refuses to start in mlflow >= 3.13, hence SQLite. $MLFLOW_TRACKING_URI or
`tracker.uri` points elsewhere, for example at a tracking server (`http://host:5000`).

Nothing it stores or prints holds user info from a URI (`user:password@`): every param, tag, run name and text
artifact is redacted on its way in, and every link it prints.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from trackers import store
from trackers.base import TrackedRun, Tracker
from trackers.store import (
    absolute_sqlite,
    check_store_reachable,
    heartbeat_tags,
    owner_tags,
    redact,
    retry_when_locked,
    sqlite_path,
    store_lock,
    why_dead,
)

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call

MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description, which the UI renders as Markdown
METRIC_DIGITS = 5  # significant digits of a non-integer metric: the UI shows all 17, timings carry fewer

# The MLflow 3.x UI opens an experiment in its GenAI view (traces) unless the URL asks for the model-training
# view: it follows the `workflowType` URL parameter, else the switch's last position in the browser (default
# GenAI); the `mlflow.experimentKind` experiment tag is read by versions without that switch.
# A view shared through the experiment tag `mlflow.sharedViewState.<key>` and opened with `viewStateShareKey=<key>`
# sets the runs table's columns: the only column default a client can give.
ORPHANED = "sweep.orphaned"  # a run a later start ended KILLED: its processes were all gone
UI_VIEW_KEY = "sweep"
UI_QUERY = f"workflowType=machine_learning&viewStateShareKey={UI_VIEW_KEY}"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow prints "View run ... at: <tracking URI>" as each run on a tracking server ends, user info included: sweep
# prints its own link instead (run_url), without user info and in the UI's model-training view.
SUPPRESS_URL_PRINTING_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """A tracking server or database that does not answer fails in seconds with one line, before anything is
    prepared (MLflow itself retries for minutes)."""
    check_store_reachable(
        "tracker.uri",
        uri,
        "start the tracking server or database, point tracker.uri (or $MLFLOW_TRACKING_URI) at one that runs, "
        "or use tracker=none",
    )


def fit_lines(text: str, limit: int) -> str:
    """`text` whole if it fits in `limit` characters, else its first lines and a last line saying how many are left
    out (a fenced code block left open is closed)."""
    if len(text) <= limit:
        return text
    lines = text.splitlines()
    kept: list[str] = []
    size = 0
    for line in lines:
        if size + len(line) + 1 > limit - 120:  # room for the closing lines
            break
        kept.append(line)
        size += len(line) + 1
    fence = ["```"] if sum(line.startswith("```") for line in kept) % 2 else []
    return "\n".join([*kept, *fence, f"... {len(lines) - len(kept)} more lines in the run's artifacts"])


def rounded(value: float) -> float:
    value = float(value)
    return value if value.is_integer() else float(f"{value:.{METRIC_DIGITS}g}")


class MLflowRun(TrackedRun):
    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            retry_when_locked(self.client.log_batch, self.run_id, params=items[i : i + BATCH])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, rounded(v), now, 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), BATCH):
            retry_when_locked(self.client.log_batch, self.run_id, metrics=items[i : i + BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), BATCH):
            retry_when_locked(self.client.log_batch, self.run_id, tags=items[i : i + BATCH])

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        retry_when_locked(self.client.log_artifact, self.run_id, str(path), artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry_when_locked(self.client.log_text, self.run_id, redact(text), artifact_file)

    def end(self, status: str) -> None:
        HEARTBEAT_KEEPER.drop(self.run_id)
        retry_when_locked(self.client.set_terminated, self.run_id, status)

    def set_description(self, markdown: str) -> None:
        """The run page's Description (the `mlflow.note.content` tag), cut at whole lines to the tag's limit."""
        self.set_tags({DESCRIPTION_TAG: fit_lines(markdown, MAX_TAG_LENGTH)})


class HeartbeatKeeper:
    """Records the heartbeat of every run this process has open, from one daemon thread, every
    HEARTBEAT_INTERVAL_S until the run ends here (or the process does): a later start anywhere then tells a run
    whose processes are all gone (trackers.store.why_dead)."""

    def __init__(self) -> None:
        self.runs: dict[str, MLflowRun] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def keep(self, run: MLflowRun) -> None:
        with self.lock:
            self.runs[run.run_id] = run
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.beat_forever, name="sweep-heartbeat", daemon=True)
                self.thread.start()

    def drop(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def beat_forever(self) -> None:
        from mlflow.entities import RunTag

        while True:
            time.sleep(store.HEARTBEAT_INTERVAL_S)
            with self.lock:
                runs = list(self.runs.values())
            for run in runs:
                try:  # a beat missed (a locked or unreachable store) is made up by the next one
                    tags = [RunTag(k, v) for k, v in heartbeat_tags().items()]
                    run.client.log_batch(run.run_id, tags=tags)
                except Exception as exc:
                    log.debug("run %s: heartbeat not recorded: %s", run.run_id, exc)


HEARTBEAT_KEEPER = HeartbeatKeeper()


class MLflowTracker(Tracker):
    def __init__(self, uri: str | None, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = absolute_sqlite(uri or default_uri())  # an artifact location beside it must be absolute
        check_reachable(self.uri)
        os.environ[SUPPRESS_URL_PRINTING_ENV] = "true"
        with store_lock(self.uri):  # the first client on a store creates or migrates its schema
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment_id(experiment)
        self.end_orphaned_runs()

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        artifact_location = None
        if db := sqlite_path(self.uri):  # keep artifacts beside the database, not in the working directory
            artifact_location = (db.parent / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another process created it between our look-up and create
            found = self.client.get_experiment_by_name(name)
            if not found:
                raise
            return found.experiment_id

    def set_view(self, params: list[str], metrics: list[str]) -> None:
        """The runs table's columns and the model-training view as the experiment's default in the MLflow UI."""
        import json

        columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
        current = self.client.get_experiment(self.experiment_id).tags
        key = f"mlflow.sharedViewState.{UI_VIEW_KEY}"
        # MLflow's shared views carry columns, order and filters, but never which parents are unfolded
        view = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
        wanted = {"mlflow.experimentKind": "custom_model_development", key: json.dumps(view)}
        for name, value in wanted.items():
            if current.get(name) != value:
                self._set_experiment_tag(name, value)

    def _set_experiment_tag(self, name: str, value: str) -> None:
        try:
            self.client.set_experiment_tag(self.experiment_id, name, value)
        except Exception:
            # Workers that start together set the same new tag at once, and a tracking server on PostgreSQL
            # inserts it for each: the second insert fails on the tag's unique key. It exists now, so set it again
            # (an update this time).
            if name not in self.client.get_experiment(self.experiment_id).tags:
                raise
            self.client.set_experiment_tag(self.experiment_id, name, value)

    def run_url(self, run_id: str) -> str:
        """Where the run opens in the UI: on the tracking server itself, or on `mlflow ui` over this store."""
        return f"{self._ui_base()}/#/experiments/{self.experiment_id}/runs/{run_id}?{UI_QUERY}"

    def experiment_url(self) -> str:
        """The experiment's runs table, with the default columns (set_view)."""
        return f"{self._ui_base()}/#/experiments/{self.experiment_id}/runs?{UI_QUERY}"

    def ui_command(self) -> str | None:
        return None if self._served() else f"mlflow ui --backend-store-uri {redact(self.uri)}"

    def _served(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def _ui_base(self) -> str:
        return redact(self.uri).rstrip("/") if self._served() else LOCAL_UI

    def start_run(
        self, name: str | None, tags: dict[str, Any], parent_run_id: str | None = None, owned: bool = True
    ) -> TrackedRun:
        tags = {k: redact(str(v)) for k, v in tags.items() if v is not None} | (owner_tags() if owned else {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        name = redact(name) if name else name
        tags |= heartbeat_tags()
        created = retry_when_locked(self.client.create_run, self.experiment_id, run_name=name, tags=tags)
        log.info("MLflow run %s in %s", created.info.run_id, redact(self.uri))
        run = MLflowRun(self.client, created.info.run_id)
        HEARTBEAT_KEEPER.keep(run)
        return run

    def end_orphaned_runs(self) -> None:
        """Runs of this experiment left RUNNING by processes that are all gone (kill -9, a lost node), on this host
        or another: end them KILLED, saying why, so that no run stays RUNNING for good."""
        now = time.time()
        for found in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'"):
            reason = why_dead(found.data.tags, now)
            if reason is None:
                continue
            log.warning("run %s was left RUNNING: %s; ending it KILLED", found.info.run_id, reason)
            orphan = MLflowRun(self.client, found.info.run_id)
            orphan.set_tags({"error": f"ended KILLED by a later start: {reason}", ORPHANED: "true"})
            orphan.end("KILLED")

    def attach(self, run_id: str) -> TrackedRun:
        """A run another process started, to log into. One a later start ended KILLED as orphaned (a study's parent
        whose workers were all killed) runs again now that a process works in it."""
        run = MLflowRun(self.client, run_id)
        found = retry_when_locked(self.client.get_run, run_id)
        resumed = found.info.status == "KILLED" and found.data.tags.get(ORPHANED) == "true"
        if resumed:
            log.info("run %s, ended KILLED as orphaned, runs again", run_id)
            retry_when_locked(self.client.update_run, run_id, status="RUNNING")
            retry_when_locked(self.client.delete_tag, run_id, "error")
            run.set_tags({ORPHANED: "false"})
        if found.info.status == "RUNNING" or resumed:
            run.set_tags(heartbeat_tags())
            HEARTBEAT_KEEPER.keep(run)
        return run

    def fail_runs(self, tags: dict[str, Any], error: str) -> None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        for found in self.client.search_runs([self.experiment_id], query):
            if found.info.status != "FAILED":
                run = MLflowRun(self.client, found.info.run_id)
                run.set_tags({"error": error})
                run.end("FAILED")
