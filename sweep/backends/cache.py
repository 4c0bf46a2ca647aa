"""Content-addressed engine cache: engines_cache/<backend>/<key>/ with a manifest.json inside.

A build goes into a temporary sibling directory that is renamed into place only when complete, under a file
lock per key, so a crash never leaves a half-written entry and two processes never build the same key twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = "files"  # in the manifest: every file of the engine, as relative path -> {"size", "sha256"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(engine_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        str(f.relative_to(engine_dir)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(engine_dir.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def read_verified(entry: Path) -> tuple[dict[str, Any], str | None]:
    """The entry's manifest and, when the entry cannot be trusted, why: the manifest is not JSON or not a
    manifest, or a recorded file is missing or differs from its recorded checksum."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{MANIFEST} is unreadable: {exc}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get(FILES), dict):
        return {}, f"{MANIFEST} has no '{FILES}' table (written by an older sweep, or damaged)"
    recorded = manifest[FILES]
    present = {str(f.relative_to(entry)) for f in entry.rglob("*") if f.is_file() and f.name != MANIFEST}
    if missing := sorted(set(recorded) - present):
        return manifest, f"missing {', '.join(missing[:3])}"
    for name, expected in recorded.items():
        file = entry / name
        if not isinstance(expected, dict) or file.stat().st_size != expected.get("size"):
            return manifest, f"{name} has changed size"
        if sha256_file(file) != expected.get("sha256"):
            return manifest, f"{name} does not match its checksum"
    return manifest, None


BUILD_PREFIX = ".tmp-"  # a build directory is <backend>/.tmp-<key>-<random>, renamed to <backend>/<key> when done


def final_dir(build_dir: Path) -> Path:
    """Where the build directory handed to a backend's build() is renamed to when the build succeeds: an artifact
    that records absolute paths (vLLM's compile-cache index) writes this one."""
    key = build_dir.name.removeprefix(BUILD_PREFIX).split("-", 1)[0]
    return build_dir.parent / key


def engine_key(key_inputs: dict[str, Any]) -> str:
    """A stable hash of everything that changes the built artifact (canonical JSON, sorted keys)."""
    canonical = json.dumps(key_inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@contextmanager
def progress(what: str, every_s: float = 15.0) -> Iterator[None]:
    """A line every `every_s` seconds while a long step (a compile, an engine build) runs, and one when it ends."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("still %s: %.0f s so far", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    elapsed = time.perf_counter() - start
    if elapsed >= every_s:
        log.info("done %s in %.0f s", what, elapsed)


@dataclass
class CacheEntry:
    path: Path
    manifest: dict[str, Any]
    hit: bool
    build_time_s: float


class EngineCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def get_or_build(
        self, backend: str, key_inputs: dict[str, Any], build: Callable[[Path], dict[str, Any]]
    ) -> CacheEntry:
        """Return the entry for `key_inputs`, calling `build(tmp_dir)` to make it on a miss.

        `build` writes the artifact into the directory it is given and returns what the manifest should add.
        """
        key = engine_key(key_inputs)
        backend_dir = self.root / backend
        backend_dir.mkdir(parents=True, exist_ok=True)
        final = backend_dir / key
        with FileLock(str(backend_dir / f"{key}.lock")):
            start = time.perf_counter()
            if (final / MANIFEST).is_file():
                manifest, problem = read_verified(final)
                if problem is None:
                    log.info("engine cache hit: reusing %s", final)
                    return CacheEntry(final, manifest, hit=True, build_time_s=time.perf_counter() - start)
                log.warning("engine cache entry %s is damaged (%s): rebuilding it", final, problem)
            self._remove_stale(backend_dir, key)
            tmp = Path(tempfile.mkdtemp(dir=backend_dir, prefix=f"{BUILD_PREFIX}{key}-"))
            try:
                log.info("engine cache miss: making %s", final)
                with progress(f"building the {backend} engine"):
                    extra = build(tmp)
                build_time = time.perf_counter() - start
                manifest = {
                    "key": key,
                    "backend": backend,
                    "key_inputs": key_inputs,
                    "build_time_s": build_time,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **extra,
                    FILES: checksums(tmp),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return CacheEntry(final, manifest, hit=False, build_time_s=build_time)

    @staticmethod
    def _remove_stale(backend_dir: Path, key: str) -> None:
        # We hold the key's lock, so any temporary directory for this key belongs to a build that died.
        for stale in backend_dir.glob(f"{BUILD_PREFIX}{key}-*"):
            log.warning("removing the remains of an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        final = backend_dir / key
        if final.exists():  # a directory without a manifest is not a finished engine
            shutil.rmtree(final, ignore_errors=True)
