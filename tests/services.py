"""Throwaway PostgreSQL and MLflow tracking servers on 127.0.0.1, for the shared-store tests.

tests/conftest.py starts them once per test session when CI has not; CI (.ci/run) starts them before pytest:

    eval "$(python tests/services.py start DIR)"   # exports SWEEP_TEST_POSTGRES_URL and SWEEP_TEST_MLFLOW_URL
    python tests/services.py stop DIR

PostgreSQL refuses to run as root: as root, the server's directory is handed to the `postgres` user (made by
Debian's postgresql package) and the server runs under `runuser -u postgres`. DIR must then be reachable by that
user (a fresh `mktemp -d` in /tmp is; pytest's own temporary directories are not).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ADMIN_USER = "sweep"
POSTGRES_DIR, MLFLOW_DIR = "postgres", "mlflow"
START_TIMEOUT_S = 120


class ServiceUnavailable(RuntimeError):
    """A server cannot be started here (no PostgreSQL programs, or one failed to start)."""


def postgres_program(name: str) -> Path | None:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (not on PATH)."""
    if found := shutil.which(name):
        return Path(found)
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parent.parent.name))
    return versions[-1] if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServiceUnavailable(f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}")


# -- PostgreSQL ---------------------------------------------------------------------------------------------------
def start_postgres(root: Path) -> str:
    """A fresh cluster in root/postgres, listening on 127.0.0.1 only; returns its admin URL (a superuser)."""
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise ServiceUnavailable("no PostgreSQL server programs (initdb, pg_ctl) on PATH or in /usr/lib/postgresql")
    home = root / POSTGRES_DIR
    home.mkdir(parents=True)
    password = secrets.token_hex(16)
    (home / "password").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(home, "postgres")
        shutil.chown(home / "password", "postgres")
    run(as_postgres_user([
        str(initdb), "-D", str(home / "data"), "-U", ADMIN_USER, f"--pwfile={home / 'password'}",
        "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions",
    ]))  # fmt: skip
    port = free_port()
    # TCP on loopback only; no Unix socket, whose default directory (/var/run/postgresql) may not exist
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    run(as_postgres_user([
        str(pg_ctl), "-D", str(home / "data"), "-l", str(home / "server.log"), "-w", "-t", str(START_TIMEOUT_S),
        "-o", options, "start",
    ]))  # fmt: skip
    return f"postgresql://{ADMIN_USER}:{password}@127.0.0.1:{port}/postgres"


def stop_postgres(root: Path) -> None:
    """Stop the cluster in root/postgres, if one was started there."""
    data = root / POSTGRES_DIR / "data"
    if (data / "postmaster.pid").exists():
        run(as_postgres_user([str(postgres_program("pg_ctl")), "-D", str(data), "-m", "fast", "-w", "stop"]))


def database_url(admin_url: str, name: str) -> str:
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl()


def create_database(admin_url: str, name: str) -> str:
    """A new, empty database on the admin URL's server; returns its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:  # CREATE DATABASE cannot run in a transaction
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- MLflow tracking server ---------------------------------------------------------------------------------------
def start_mlflow(root: Path, backend_store_url: str) -> str:
    """`mlflow server` on 127.0.0.1 with its runs in `backend_store_url` and artifacts served from root/mlflow;
    returns its URL once it answers."""
    home = root / MLFLOW_DIR
    home.mkdir(parents=True)
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_url, "--artifacts-destination", str(home / "artifacts"),
    ]  # fmt: skip
    # without MLflow's job runner (GenAI jobs, which sweep does not use): eight fewer processes
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(home / "server.log", "wb") as log:
        # its own session: stopping it ends its web server's workers too
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (home / "pid").write_text(str(server.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ServiceUnavailable(f"mlflow server exited ({server.returncode}): {(home / 'server.log').read_text()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return url
        except OSError:
            time.sleep(0.5)
    raise ServiceUnavailable(f"mlflow server did not answer on {url} in {START_TIMEOUT_S} s")


def stop_mlflow(root: Path) -> None:
    """End the server started in root/mlflow and its workers, if one was started there."""
    pid_file = root / MLFLOW_DIR / "pid"
    if not pid_file.exists():
        return
    leader = int(pid_file.read_text())
    try:
        os.killpg(leader, signal.SIGTERM)  # the server passes it on to its workers
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while running(leader) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(leader, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass


def running(pid: int) -> bool:
    """Whether the process runs; a zombie does not. The fixture's own child is reaped here."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: CI's server, started by an earlier process
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- both, for CI ---------------------------------------------------------------------------------------------------
def start(root: Path) -> dict[str, str]:
    """PostgreSQL, then an MLflow server on its own database of it; the URLs the tests read from the environment."""
    admin_url = start_postgres(root)
    mlflow_url = start_mlflow(root, create_database(admin_url, "mlflow"))
    return {"SWEEP_TEST_POSTGRES_URL": admin_url, "SWEEP_TEST_MLFLOW_URL": mlflow_url}


def stop(root: Path) -> None:
    stop_mlflow(root)
    stop_postgres(root)


if __name__ == "__main__":
    usage = "usage: python tests/services.py start|stop DIR"
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(usage)
    action, directory = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        for name, value in start(directory).items():
            print(f"export {name}={shlex.quote(value)}")
    else:
        stop(directory)
