"""Fault injection: bad inputs, faults (signals, kill -9, a locked store, corrupt cache entries, secrets in URIs)
and concurrency. Each test reproduces one fault with the real components (Hydra, MLflow on SQLite,
Optuna, transformers on the tiny model); what is faked is said in the test.

Most probes run in-process; a real process is used only where the behaviour needs one: signals, kill -9, two
processes at once, and a multirun's exit status.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, mlflow_runs, run_sweep

from sweep.config.errors import ConfigError
from sweep.job.compose import compose

SMALL = ["workload.iterations=1", "workload.num_requests=1", "workload.warmup_requests=0"]
SECRET = "hunter2"


def config(tmp_path: Path, *overrides: str):
    return compose(
        [f"tracker.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"cache_dir={tmp_path}/engines_cache", *overrides]
    )


def python(code: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# -- bad inputs: a one-line ConfigError naming key, value and what is allowed; nothing recorded ----------------
def dataset(tmp_path: Path, content: bytes | list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else "\n".join(json.dumps(r) for r in content).encode())
    return f"workload.dataset={path}"


def damaged_checkpoint(tmp_path: Path, tiny_checkpoint: Path, damage) -> str:
    import shutil

    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    damage(copy)
    return f"model.path={copy}"


def truncate(file: Path, size) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: size(len(data))])


BAD_INPUTS = {
    "dataset not UTF-8": (lambda t, c: [dataset(t, b'{"prompt": "\xff\xfe", "output_tokens": 2}')], "is not UTF-8"),
    "token id out of the vocabulary": (
        lambda t, c: [dataset(t, [{"input_ids": [1, 99999], "output_tokens": 2}])],
        "input_ids must be a list of token ids, integers in [0, 320)",
    ),
    "negative token id": (
        lambda t, c: [dataset(t, [{"input_ids": [-1], "output_tokens": 2}])],
        "input_ids must be a list of token ids",
    ),
    "token ids not integers": (
        lambda t, c: [dataset(t, [{"input_ids": [1.5, "a"], "output_tokens": 2}])],
        "input_ids must be a list of token ids",
    ),
    "a list as prompt": (
        lambda t, c: [dataset(t, [{"prompt": ["a", "b"], "output_tokens": 2}])],
        "prompt must be a string, not list",
    ),
    "output_tokens true": (
        lambda t, c: [dataset(t, [{"prompt": "hello", "output_tokens": True}])],
        "output_tokens >= 1, an integer",
    ),
    "config.json not JSON": (
        lambda t, c: [damaged_checkpoint(t, c, lambda d: (d / "config.json").write_text("{not json"))],
        "config.json is not a usable Hugging Face model config (JSONDecodeError",
    ),
    "config.json a list": (
        lambda t, c: [damaged_checkpoint(t, c, lambda d: (d / "config.json").write_text("[1, 2]"))],
        "config.json is not a usable Hugging Face model config",
    ),
    "safetensors header truncated": (
        lambda t, c: [damaged_checkpoint(t, c, lambda d: truncate(d / "model.safetensors", lambda n: 20))],
        "model.safetensors is not a readable safetensors file",
    ),
    "safetensors data truncated": (
        lambda t, c: [damaged_checkpoint(t, c, lambda d: truncate(d / "model.safetensors", lambda n: n - 1000))],
        "model.safetensors is not a readable safetensors file",
    ),
    "model.path a file": (
        lambda t, c: [f"model.path={c / 'config.json'}"],
        "is not a Hugging Face checkpoint directory (it is a file)",
    ),
    "workload.seed=-1": (lambda t, c: ["workload.seed=-1"], "workload.seed=-1 is not allowed; it must be >= 0"),
    "input_len_std=nan": (
        lambda t, c: ["workload.input_len_std=nan"],
        "workload.input_len_std=nan is not allowed; it must be a finite number",
    ),
    "output_len_std=inf": (
        lambda t, c: ["workload.output_len_std=inf"],
        "workload.output_len_std=inf is not allowed; it must be a finite number",
    ),
    # 1e23 itself is refused by Hydra while composing (a float for an int key); 10**23 as an int reached torch
    "model.seed=10**23": (
        lambda t, c: [f"model.seed={10**23}"],
        f"model.seed={10**23} is not allowed; it must be <= 4294967295",
    ),
    "tracker.experiment empty": (lambda t, c: ["tracker.experiment=''"], "tracker.experiment='' is not allowed"),
    "tracker.uri nonsense": (
        lambda t, c: ["tracker.uri=nonsense"],
        "tracker.uri='nonsense' is not allowed; use sqlite",
    ),
    "tracker.uri file://": (
        lambda t, c: [f"tracker.uri=file://{t}/mlruns"],
        "is not allowed; use sqlite:///<path to a .db file>",
    ),
    "tracker unreachable (item 8)": (
        lambda t, c: ["tracker.uri=http://127.0.0.1:1"],
        "tracker.uri='http://127.0.0.1:1' cannot be reached",
    ),
    "tracker database unreachable": (
        lambda t, c: ["tracker.uri=postgresql+psycopg://sweep:secret@127.0.0.1:1/runs"],
        "tracker.uri='postgresql+psycopg://***@127.0.0.1:1/runs' cannot be opened (connection failed",
    ),
    "num_requests unbounded": (
        lambda t, c: ["workload.num_requests=100000000"],
        "workload.num_requests=100000000 is not allowed; it must be <= 100000",
    ),
    "compiled engine larger than host memory": (
        lambda t, c: ["backend=compiled", "engine.max_batch_size=100000000", "engine.max_num_tokens=100000000"],
        "more than the host's",
    ),
    "TPOT objective with 1 output token (item 5)": (
        lambda t, c: ["workload.output_len=1", "objective.metric=tpot_ms_p50", "objective.direction=minimize"],
        "objective.metric='tpot_ms_p50' needs a measured request with at least 2 output tokens",
    ),
    "goodput objective without an SLO": (
        lambda t, c: ["objective.metric=goodput_req_s"],
        "objective.metric='goodput_req_s' is recorded only under an SLO, and slo='none' sets none",
    ),
    "achieved rate objective on workload=latency": (
        lambda t, c: ["objective.metric=achieved_rate_req_s"],
        "objective.metric='achieved_rate_req_s' is recorded only by an open loop",
    ),
    "achieved rate objective with every request at t0": (
        lambda t, c: ["workload=rate", "workload.request_rate=inf", "objective.metric=achieved_rate_req_s"],
        "this run's workload.scenario is 'rate' at workload.request_rate=inf",
    ),
    "TPOT objective, variable lengths all 1": (
        lambda t, c: [dataset(t, [{"prompt": "hi", "output_tokens": 1}]), "objective.metric=itl_ms_p99"],
        "objective.metric='itl_ms_p99' needs a measured request with at least 2 output tokens",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_key_and_value_and_nothing_is_recorded(tmp_path, tiny_checkpoint, case):
    from sweep import run

    make_overrides, message = BAD_INPUTS[case]
    overrides = make_overrides(tmp_path, tiny_checkpoint)
    if not any(o.startswith("model.path=") for o in overrides):
        overrides.append(f"model.path={tiny_checkpoint}")
    if any(o.startswith("tracker.uri=") for o in overrides):  # the probe's store, never a default one
        cfg = compose([f"cache_dir={tmp_path}/engines_cache", *overrides])
    else:
        cfg = config(tmp_path, *overrides)
    with pytest.raises(ConfigError) as refused:
        run(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert mlflow_runs(tmp_path) == []
    assert not list((tmp_path / "engines_cache").glob("*/*/manifest.json"))


def test_a_relative_sqlite_store_is_opened_under_the_working_directory(tmp_path, tiny_checkpoint, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sweep import run

    monkeypatch.chdir(tmp_path)
    cfg = compose(["tracker.uri=sqlite:///rel/mlflow.db", f"cache_dir={tmp_path}/engines_cache",
                   f"model.path={tiny_checkpoint}", "workload.output_len=2", *SMALL])  # fmt: skip
    result = run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/rel/mlflow.db")
    (recorded,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert recorded.info.run_id == result.run_id and recorded.info.status == "FINISHED"
    assert recorded.info.artifact_uri.startswith((tmp_path / "rel" / "artifacts").as_uri())
    assert "config.yaml" in [a.path for a in client.list_artifacts(result.run_id)]


# -- item 1: creating a store from several processes at once -----------------------------------------------------
def test_first_runs_side_by_side_create_one_sound_store(tmp_path):
    """Two processes open a fresh MLflow store and a fresh Optuna storage at the same moment."""
    code = f"""
import optuna
from trackers.mlflow_tracker import MLflowTracker
from trackers.store import store_lock
run = MLflowTracker("sqlite:///{tmp_path}/mlruns/mlflow.db", "sweep").start_run("r", {{}})
run.end("FINISHED")
storage = "sqlite:///{tmp_path}/mlruns/optuna.db"
with store_lock(storage):
    optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
"""
    procs = [python(code, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(r.info.status for r in mlflow_runs(tmp_path)) == ["FINISHED"] * 2
    import optuna

    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/mlruns/optuna.db")] == ["s"]


def test_a_multirun_whose_parent_run_cannot_be_created_fails_loudly(tmp_path):
    (tmp_path / "not-a-dir").write_text("")  # the store's directory is a file: the parent run cannot be created
    result = run_sweep(tmp_path, "-m", "engine.max_batch_size=1,2", f"tracker.uri=sqlite:///{tmp_path}/not-a-dir/m.db")
    assert result.returncode == 1
    assert "the sweep's parent run could not be created" in result.stdout + result.stderr
    assert not list((tmp_path / "multirun").glob("*/*/0"))  # no job ran as an orphan


# -- item 2: a locked store never throws a finished benchmark away -----------------------------------------------
def locked_error() -> Exception:
    """The error MLflow raises when SQLite stays locked past its 20 s busy timeout (raised here directly, since
    holding a real lock that long would cost CI 20 s per probe)."""
    from mlflow.exceptions import MlflowException

    return MlflowException(str(sqlite3.OperationalError("database is locked")))


def test_logging_retries_while_the_store_is_locked(tmp_path, monkeypatch):
    from trackers import store
    from trackers.mlflow_tracker import MLflowTracker

    monkeypatch.setattr(store, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    tracker = MLflowTracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "sweep")
    run = tracker.start_run("r", {})
    real_log_batch, failures = tracker.client.log_batch, [locked_error(), locked_error()]

    def locked_twice(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", locked_twice)
    run.log_metrics({"output_throughput_tok_s": 1.5})
    run.end("FINISHED")
    (recorded,) = mlflow_runs(tmp_path)
    assert recorded.data.metrics == {"output_throughput_tok_s": 1.5}


def test_a_run_the_store_refuses_keeps_its_figures_locally_and_says_where(tmp_path, tiny_checkpoint, monkeypatch):
    from sweep.job import execute as run_module
    from trackers.mlflow_tracker import MLflowRun

    def always_locked(self, metrics):
        raise locked_error()

    monkeypatch.setattr(MLflowRun, "log_metrics", always_locked)
    monkeypatch.setattr(run_module, "job_output_dir", lambda: tmp_path / "out")  # as a Hydra job has
    monkeypatch.setattr(run_module, "hydra_log_file", lambda: None)
    (tmp_path / "out").mkdir()
    with pytest.raises(run_module.RecordError, match=f"its figures and artifacts are in {tmp_path / 'out'}"):
        run_module.run(config(tmp_path, f"model.path={tiny_checkpoint}", "workload.output_len=2", *SMALL))
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())["figures"]
    assert figures["output_throughput_tok_s"] > 0
    assert {p.name for p in (tmp_path / "out" / "artifacts").iterdir()} >= {"config.yaml", "results.json"}
    (recorded,) = mlflow_runs(tmp_path)
    assert recorded.info.status == "FAILED" and "database is locked" in recorded.data.tags["error"]


# -- item 3: SIGTERM and kill -9 ---------------------------------------------------------------------------------
def wait_for_benchmark(workdir: Path, proc: subprocess.Popen) -> None:
    """Until the run's engine is ready (its cache tag is set just before the benchmark starts)."""
    from trackers.store import store_lock

    while proc.poll() is None:
        with store_lock(f"sqlite:///{workdir}/mlruns/mlflow.db"):  # the run's process may be creating the store
            if any(r.info.status == "RUNNING" and "engine.cache_hit" in r.data.tags for r in mlflow_runs(workdir)):
                return
        time.sleep(0.2)


def start(workdir: Path, *overrides: str) -> subprocess.Popen:
    # faulthandler: a process that hangs shows every thread's stack when `ended` aborts it
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sweep", *overrides],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hear_ctrl_c,
    )


def hear_ctrl_c() -> None:
    """Ctrl-C reaches the process as it reaches one started at a terminal: a suite started in the background
    (`.ci/run &`) ignores SIGINT, and every process below it would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


LONG = ["workload.num_requests=2000", "workload.output_len=32"]


def ended(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The process's output once it exits; one still running after `timeout` fails the test with its threads'
    stacks (SIGABRT through faulthandler), which say where it hung."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"still running {timeout:.0f} s after the signal; its threads:\n{stderr[-6000:]}")


def test_sigterm_during_a_benchmark_ends_the_run_killed_and_says_so_in_one_line(tmp_path):
    proc = start(tmp_path, *LONG)
    wait_for_benchmark(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = ended(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED", stderr[-3000:]
    assert run.data.tags["error"] == "KeyboardInterrupt: terminated by SIGTERM"
    assert "Traceback" not in stdout + stderr
    (outputs,) = (tmp_path / "outputs").glob("*/*")
    assert stderr.splitlines()[-1] == (
        f"terminated by SIGTERM: run {run.info.run_id} ended KILLED; its log and config are in "
        f"{outputs.relative_to(tmp_path)}/; every engine built before it stays in the engine cache; "
        "resume: run the same command again"
    )


def test_ctrl_c_during_a_grid_ends_its_parent_and_the_running_job_killed_in_one_line(tmp_path):
    proc = start(tmp_path, "-m", "engine.max_batch_size=1,2", *LONG)
    wait_for_benchmark(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = ended(proc)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    runs = {r.info.run_name: r for r in mlflow_runs(tmp_path)}
    parent, job = runs["grid: engine.max_batch_size=1,2"], runs["tiny/hf max_batch_size=1"]
    assert len(runs) == 2 and parent.info.status == job.info.status == "KILLED", stderr[-3000:]
    assert parent.data.tags["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"
    assert "Traceback" not in stdout + stderr
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert stderr.splitlines()[-1] == (
        f"interrupted (Ctrl-C): 0 of 1 started jobs finished; sweep run {parent.info.run_id} ended KILLED; "
        f"kept: {sweep_dir.relative_to(tmp_path)}/ and their MLflow runs; "
        "resume: run the same command again (every point runs again, reusing the engines built)"
    )


def test_sigterm_during_a_build_removes_the_temporary_directory(tmp_path, monkeypatch):
    """The real signal, delivered to this process mid-build, through the handler `python -m sweep` installs."""
    from sweep.__main__ import terminate
    from sweep.backends.cache import EngineCache

    previous = signal.signal(signal.SIGTERM, terminate)
    try:

        def build(tmp: Path) -> dict:
            (tmp / "half-written.bin").write_bytes(b"0" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
            return {}

        with pytest.raises(KeyboardInterrupt, match="terminated by SIGTERM"):
            EngineCache(tmp_path).get_or_build("hf", {"k": 1}, build)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in (tmp_path / "hf").iterdir() if not p.name.endswith(".lock")] == []


def test_a_run_whose_process_was_killed_is_ended_at_the_next_start_and_the_report_skips_it(tmp_path):
    from sweep.report.selection import find_parent
    from trackers.mlflow_tracker import MLflowTracker

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    finished = MLflowTracker(uri, "sweep").start_run("older sweep", {"sweep.kind": "multirun"})
    finished.end("FINISHED")
    killed = python(
        f"""
import os, signal
from trackers.mlflow_tracker import MLflowTracker
run = MLflowTracker("{uri}", "sweep").start_run("dead sweep", {{"sweep.kind": "multirun"}})
print(run.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
""",
        tmp_path,
    )
    dead_id = killed.communicate(timeout=120)[0].split()[-1]
    assert killed.returncode == -signal.SIGKILL

    tracker = MLflowTracker(uri, "sweep")  # the next start reconciles
    dead = tracker.client.get_run(dead_id)
    assert dead.info.status == "KILLED"
    assert "is gone" in dead.data.tags["error"] and dead.data.tags["sweep.orphaned"] == "true"
    assert find_parent(tracker.client, [tracker.experiment_id], None) == finished.run_id


# -- item 4: a bad point refuses the whole grid before any point runs: tests/test_grid_check.py ---------------


# -- item 6: no password from a URI is stored or printed ---------------------------------------------------------
def test_user_info_in_uris_is_never_stored_or_printed(tmp_path):
    url = f"https://user:{SECRET}@example.com/data"
    result = run_sweep(tmp_path, f"+tracker.tags.source={url}", "workload.output_len=2", *SMALL)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    (run,) = mlflow_runs(tmp_path)
    assert run.data.tags["source"] == "https://***@example.com/data"
    assert SECRET not in json.dumps([run.data.params, run.data.tags])
    stored = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file() and not p.name.startswith("mlflow.db")]
    stored += [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in stored) and any(p.suffix == ".log" for p in stored)
    assert [p for p in stored if SECRET in p.read_text(errors="replace")] == []


def test_log_lines_are_redacted(caplog):
    import logging

    from sweep.__main__ import redact_log_records

    factory = logging.getLogRecordFactory()
    try:
        redact_log_records()
        logging.getLogger("probe").warning("server %s is down", f"http://me:{SECRET}@host:5000")
    finally:
        logging.setLogRecordFactory(factory)
    assert caplog.records[-1].getMessage() == "server http://***@host:5000 is down"


# -- item 7: a corrupt engine cache entry is detected and rebuilt ------------------------------------------------
def corrupt_manifest_not_json(entry: Path) -> None:
    (entry / "manifest.json").write_text("{truncated")


def corrupt_manifest_shape(entry: Path) -> None:
    (entry / "manifest.json").write_text("[1, 2]")


def corrupt_missing_file(entry: Path) -> None:
    (entry / "compile_cache.bin").unlink()


def corrupt_flipped_byte(entry: Path) -> None:
    data = bytearray((entry / "compile_cache.bin").read_bytes())
    data[10] ^= 0xFF
    (entry / "compile_cache.bin").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (corrupt_manifest_not_json, "manifest.json is unreadable"),
        (corrupt_manifest_shape, "manifest.json has no 'files' table"),
        (corrupt_missing_file, "missing compile_cache.bin"),
        (corrupt_flipped_byte, "compile_cache.bin does not match its checksum"),
    ],
)
def test_a_corrupt_cache_entry_is_rebuilt_saying_why(tmp_path, caplog, corrupt, reason):
    from sweep.backends.cache import EngineCache

    builds = []

    def build(tmp: Path) -> dict:
        builds.append(tmp)
        (tmp / "compile_cache.bin").write_bytes(bytes(range(256)))
        return {}

    cache = EngineCache(tmp_path)
    first = cache.get_or_build("compiled", {"k": 1}, build)
    assert cache.get_or_build("compiled", {"k": 1}, build).hit  # intact: a hit, verified
    corrupt(first.path)
    again = cache.get_or_build("compiled", {"k": 1}, build)
    assert not again.hit and len(builds) == 2
    assert (again.path / "compile_cache.bin").read_bytes() == bytes(range(256))
    assert f"is damaged ({reason}" in caplog.text and "rebuilding it" in caplog.text


# -- item 9: unique output directories ---------------------------------------------------------------------------
def test_two_sweeps_started_together_get_their_own_directories(tmp_path):
    code = """
from hydra import compose as hydra_compose, initialize_config_dir
from sweep.job.compose import CONF_DIR, register_configs
register_configs()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = hydra_compose(config_name="config", return_hydra_config=True)
print(cfg.hydra.sweep.dir, cfg.hydra.sweep.dir, cfg.hydra.run.dir)
"""
    procs = [python(code, tmp_path) for _ in range(2)]
    lines = [p.communicate(timeout=120)[0].split()[-3:] for p in procs]
    (a_sweep, a_again, a_run), (b_sweep, _, b_run) = lines
    assert a_sweep == a_again  # stable within a sweep: every job writes under the same directory
    assert a_sweep != b_sweep and a_run != b_run


# -- item 10: the sweeper's plot directories are removed ---------------------------------------------------------
def test_the_sweepers_plot_directories_are_removed(tmp_path, monkeypatch):
    import optuna

    from hydra_plugins.sweep_optuna_sweeper._budget import Budget
    from hydra_plugins.sweep_optuna_sweeper._record import ParentRun
    from trackers import PARENT_RUN_ENV
    from trackers.mlflow_tracker import MLflowTracker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = config(tmp_path)
    parent = MLflowTracker(cfg.tracker.uri, "sweep").start_run("sweep", {"sweep.kind": "optuna"})
    monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_int("engine.max_batch_size", 1, 8), n_trials=3)
    ParentRun(cfg).log_summary({"output_throughput_tok_s": "maximize"}, study, Budget(None, "cpu"))
    assert list((tmp_path / "tmp").iterdir()) == []
    plots = list((tmp_path / "mlruns" / "artifacts").rglob("plots/*.png"))
    assert {p.stem for p in plots} == {"optimization_history", "param_importances"}
