"""The routes a module declares through its `_routes` export: learned once per module version.

`_routes` is guest code. It runs once per sha256, never on a serving path, and what it printed
is stored: in the manifest entry of an upload (store.py, `declared_routes`), and for a module
named by modules.toml (or a version of a format 1 manifest) in `RoutesCache`, a small JSON file
per sha256 in the server's private artifact-cache folder. Every later load, in every worker,
after every restart, reads the stored result instead of running the module.

What a module may declare is bounded by its tenant's policy: the bytes `_routes` prints
(`max_routes_output_bytes`: the guest is stopped past it), the routes of one module
(`max_routes_per_module`, its own route included) and, in tenants.py, the routes of a tenant
(`max_routes`). Past any, the module is refused with a message naming the key.

Everything here blocks (guest code, file I/O): call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestOutputTooLarge, ModuleRejected
from .files import write_atomically
from .routing import RouteError, parse_routes_output
from .sandbox import GuestLimits, PreparedModule, Sandbox
from .store import DeclaredRoutes

__all__ = [
    "ROUTES_EXPORT",
    "Declared",
    "RoutesCache",
    "RoutesRefused",
    "check_route_count",
    "run_routes_export",
]

log = logging.getLogger("supervisor.routes")
guest_log = logging.getLogger("supervisor.guest")

ROUTES_EXPORT = "_routes"
CACHE_SUFFIX = ".routes.json"
LOCK_FILE = "routes.lock"
"""Locked one byte per sha256 (a POSIX record lock at an offset taken from the digest), so
two workers starting at once run a module's `_routes` once, not twice, while modules of
different content are learned in parallel: a `_routes` that sleeps delays only its own."""
_LOCK_OFFSETS = 2**31
"""Record-lock offsets drawn from a digest; two digests sharing one merely wait for each other."""
_STDERR_LOG_BYTES = 4096
"""Bytes of `_routes` stderr copied into the log (the module author's only debugging aid)."""


class RoutesRefused(ModuleRejected):
    """A module refused for what its `_routes` printed; `key` names the limit or `_routes`."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Declared:
    """What a `_routes` run printed: its routes and how many bytes that took."""

    routes: DeclaredRoutes
    output_bytes: int


def run_routes_export(
    sandbox: Sandbox,
    prepared: PreparedModule,
    limits: GuestLimits,
    *,
    max_output_bytes: int,
    name: str,
) -> Declared:
    """Run `_routes` (no args, env or stdin), reading at most `max_output_bytes` of its output.

    A module without `_routes` declares nothing. Raises ModuleRejected naming the problem.
    """
    if ROUTES_EXPORT not in prepared.exports:
        return Declared((), 0)
    run_limits = dataclasses.replace(limits, max_stdout_bytes=max_output_bytes)
    run = sandbox.run(prepared, ROUTES_EXPORT, argv=[], env={}, stdin=b"", limits=run_limits)
    if run.stderr:
        text = run.stderr[:_STDERR_LOG_BYTES].decode("utf-8", errors="replace")
        guest_log.info("%s `_routes` stderr: %r", name, text)
    if isinstance(run.error, GuestOutputTooLarge):
        raise RoutesRefused(
            f"{name}: `_routes` printed more than max_routes_output_bytes ({max_output_bytes})",
            key="max_routes_output_bytes",
        )
    if run.error is not None:
        raise RoutesRefused(f"{name}: `_routes` failed: {run.error.message}", key=ROUTES_EXPORT)
    try:
        routes = parse_routes_output(run.stdout.decode("utf-8", errors="replace"))
    except RouteError as exc:
        raise RoutesRefused(f"{name}: {exc}", key=ROUTES_EXPORT) from exc
    log.info("%s: `_routes` declared %d routes in %.1fms", name, len(routes), run.duration_s * 1e3)
    return Declared(tuple(routes), len(run.stdout))


def check_route_count(routes: DeclaredRoutes, *, max_routes_per_module: int, name: str) -> None:
    """Refuse a module whose own route and declared routes exceed `max_routes_per_module`."""
    count = 1 + len(routes)
    if count > max_routes_per_module:
        raise RoutesRefused(
            f"{name}: {count} routes (its own and {len(routes)} from `_routes`) exceed "
            f"max_routes_per_module ({max_routes_per_module})",
            key="max_routes_per_module",
        )


class RoutesCache:
    """`Declared` by module sha256, as files in a folder private to the server.

    A file is written atomically and holds `{"routes": [[pattern, export], ...],
    "output_bytes": n}`; one that can't be read or parsed is learned again and replaced.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None  # opened once: closing any descriptor of the file
        # would drop every record lock this process holds on it
        self._threads: dict[str, threading.Lock] = {}  # record locks don't exclude threads
        self._guard = threading.Lock()

    def peek(self, sha256: str) -> Declared | None:
        """The stored result for `sha256`, or None; never runs anything (a file written
        atomically is read whole or not at all)."""
        return self._read(sha256)

    def get(self, sha256: str, learn: Callable[[], Declared]) -> Declared:
        """The stored result for `sha256`, else `learn()`'s, then stored (under its lock)."""
        with self._locked(sha256):
            declared = self._read(sha256)
            if declared is None:
                declared = learn()
                self._write(sha256, declared)
            return declared

    @contextlib.contextmanager
    def _locked(self, sha256: str) -> Iterator[None]:
        with self._guard:
            thread_lock = self._threads.setdefault(sha256, threading.Lock())
            if self._lock_fd is None:
                try:
                    self._lock_fd = os.open(
                        self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                    )
                except OSError as exc:  # an unusable cache costs runs, not service
                    log.warning("routes cache %s unusable (%s)", self.directory, exc.strerror)
            fd = self._lock_fd
        offset = int(sha256[:8], 16) % _LOCK_OFFSETS
        with thread_lock:
            if fd is None:
                yield
                return
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)

    def _read(self, sha256: str) -> Declared | None:
        path = self.directory / f"{sha256}{CACHE_SUFFIX}"
        try:
            document = json.loads(path.read_bytes())
            routes = tuple((str(pattern), str(export)) for pattern, export in document["routes"])
            return Declared(routes, int(document["output_bytes"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("routes cache file %s unreadable (%s); learning again", path.name, exc)
            return None

    def _write(self, sha256: str, declared: Declared) -> None:
        path = self.directory / f"{sha256}{CACHE_SUFFIX}"
        document = {
            "routes": [list(pair) for pair in declared.routes],
            "output_bytes": declared.output_bytes,
        }
        try:
            write_atomically(path, json.dumps(document).encode())
        except OSError as exc:
            log.warning("could not store %s: %s", path.name, exc.strerror)
