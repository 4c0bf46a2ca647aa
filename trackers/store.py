"""Safety around a tracking store: serialised creation, retries on a locked SQLite file, run ownership, redaction.

- Two processes creating or migrating the same store at once break it (MLflow's and Optuna's schema creation and
  alembic migrations are not safe to run concurrently; on PostgreSQL the loser fails on a duplicate key of the
  catalog): `store_lock` serialises them, with a file lock beside a SQLite file and an advisory lock on a
  PostgreSQL database, which holds across machines.
- A writer holding a SQLite database longer than MLflow's busy timeout makes a call fail with "database is
  locked": `retry_when_locked` tries again with backoff.
- A run records the process that owns it (`owner_tags`), and every process that has it open records a heartbeat
  in it (`heartbeat_tags`) while it lives; a later start ends the runs whose processes are gone (`why_dead`): at
  once for a process of its own host, by the heartbeat's age for another host's, so kill -9 or a lost node never
  leaves a run RUNNING for good.
- A store's server that does not answer, or refuses the connection, fails in seconds with one line naming the
  config key (`check_store_reachable`): MLflow retries a tracking server for minutes, and a database driver's error is
  a page of traceback.
- User info in a URI (`user:password@`) is never logged, stored or printed (`redact`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from filelock import FileLock

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEME = "postgresql"
DATABASE_SCHEMES = (POSTGRES_SCHEME, "mysql", "mssql")  # each also as <scheme>+<driver>://
CONNECT_TIMEOUT_S = 3  # whole seconds: libpq's and the MySQL drivers' unit
STORE_LOCK_NAME = "sweep-store"  # the PostgreSQL advisory lock every sweep process takes to create a store
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # after MLflow's own 20 s busy timeout on each attempt
OWNER_HOST, OWNER_PID, OWNER_STARTED = "sweep.owner.host", "sweep.owner.pid", "sweep.owner.started"
# The time (epoch seconds) a process that has the run open last said it lives, and which process: "host pid started"
HEARTBEAT, HEARTBEAT_BY = "sweep.heartbeat", "sweep.heartbeat.by"
HEARTBEAT_INTERVAL_S = 60.0
# A run no process has beaten for this long is dead wherever it ran: ten beats missed, not one slow store.
HEARTBEAT_STALE_S = 600.0
# `scheme://user:password@`, also as Hydra writes an override's value into its files: `scheme\://user\:password@`
USER_INFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*\\?://)[^/@\s]+@")


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, anywhere in a text, also with the colons Hydra escapes."""
    return USER_INFO.sub(lambda m: f"{m['scheme']}***@", text)


def redact_file(path: Path) -> None:
    """Rewrite a text file (Hydra's own config files) without user info in its URIs."""
    if path.is_file() and redact(text := path.read_text()) != text:
        path.write_text(redact(text))


class StoreUnreachable(ValueError):
    """A store's server does not answer or refuses the connection (a ConfigError for sweep, which trackers cannot
    import)."""


def scheme_of(uri: str) -> str:
    """The URI's scheme without SQLAlchemy's driver: postgresql+psycopg:// -> postgresql."""
    return urlsplit(uri).scheme.split("+", 1)[0]


def check_store_reachable(key: str, uri: str, advice: str) -> None:
    """Raise StoreUnreachable, naming `key`, when the server of the store at `uri` (a tracking server or a
    database) cannot be connected to; nothing for a SQLite file."""
    parts = urlsplit(uri)
    if scheme_of(uri) in ("http", "https"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
            return
        except OSError as exc:
            problem = f"cannot be reached ({exc.strerror or exc})"
    elif scheme_of(uri) in DATABASE_SCHEMES:
        refusal = database_refusal(uri)
        if refusal is None:
            return
        problem = f"cannot be opened ({refusal})"
    else:
        return
    raise StoreUnreachable(f"{key}={redact(uri)!r} {problem}; {advice}")


def database_refusal(uri: str) -> str | None:
    """Why a connection to the database fails (the first line of the driver's reason), or None when it opens."""
    import sqlalchemy

    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if scheme_of(uri) != "mssql" else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    except ImportError as exc:
        return f"its driver is not installed: {exc}"
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.DBAPIError as exc:
        return redact(str(exc.orig).strip().splitlines()[0])
    finally:
        engine.dispose()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


def absolute_sqlite(uri: str) -> str:
    """A SQLite URI with a relative path (sqlite:///rel/mlflow.db) resolved against the working directory, as
    SQLite itself would open it; any other URI as it is."""
    path = sqlite_path(uri)
    return f"{SQLITE_PREFIX}{Path.cwd() / path}" if path is not None and not path.is_absolute() else uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's creation lock: a file lock beside a SQLite store (creating its directory), an advisory
    lock on a PostgreSQL database; nothing for a tracking server, which made its store once when it started."""
    if (path := sqlite_path(uri)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            yield
    elif scheme_of(uri) == POSTGRES_SCHEME:
        with postgres_advisory_lock(uri):
            yield
    else:
        yield


@contextlib.contextmanager
def postgres_advisory_lock(uri: str) -> Iterator[None]:
    """The store's creation lock on a PostgreSQL database, on a connection of its own."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)  # closing it disconnects: unlocked
    try:
        with advisory_lock(engine, STORE_LOCK_NAME):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def advisory_lock(engine: Any, name: str) -> Iterator[None]:
    """A session-level PostgreSQL advisory lock called `name`, held on one connection of the SQLAlchemy `engine`
    until the block ends; the server releases it when that connection dies, so a killed process never keeps it."""
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)  # a lock is a 64-bit int
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def is_locked_error(exc: BaseException) -> bool:
    return "database is locked" in str(exc)


def retry_when_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if delay is None or not is_locked_error(exc):
                raise
            log.warning("the tracking store is locked by another writer: retrying in %.0f s", delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid apart; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid), OWNER_STARTED: str(process_started(pid))}


def owner_alive(tags: dict[str, str]) -> bool:
    """False only when the run's owner was on this host and its process is gone (or its pid was reused)."""
    if tags.get(OWNER_HOST) != socket.gethostname() or not tags.get(OWNER_PID, "").isdigit():
        return True  # another host's process, or a run from before owners were recorded: we cannot tell
    return process_started(int(tags[OWNER_PID])) == tags.get(OWNER_STARTED)


def this_process() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()} {pid} {process_started(pid)}"


def heartbeat_tags() -> dict[str, str]:
    return {HEARTBEAT: f"{time.time():.0f}", HEARTBEAT_BY: this_process()}


def why_dead(tags: dict[str, str], now: float) -> str | None:
    """Why every process of a RUNNING run is gone, or None while one may live.

    Its owner on this host is gone: dead at once. Otherwise its heartbeat tells: older than HEARTBEAT_STALE_S,
    wherever it ran; or last beaten by a process of this host that is gone, longer ago than two beats (a process
    elsewhere that shares the run would have beaten since).
    """
    if tags.get(OWNER_HOST) == socket.gethostname() and tags.get(OWNER_PID, "").isdigit():
        return None if owner_alive(tags) else f"its process (pid {tags[OWNER_PID]} on this host) is gone"
    try:
        age = now - float(tags[HEARTBEAT])
    except (KeyError, ValueError):
        return None  # a run from before heartbeats were recorded: we cannot tell
    by = tags.get(HEARTBEAT_BY, "").split()
    if age > HEARTBEAT_STALE_S:
        where = f" (the last from pid {by[1]} on {by[0]})" if len(by) == 3 else ""
        return f"no process has recorded its heartbeat for {age / 60:.0f} minutes{where}"
    if len(by) == 3 and by[0] == socket.gethostname() and by[1].isdigit() and age > 2 * HEARTBEAT_INTERVAL_S:
        if process_started(int(by[1])) != by[2]:
            return f"the last process that had it open (pid {by[1]} on this host) is gone, and none has since"
    return None
