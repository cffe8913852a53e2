"""Modules loaded in this process: loaded on their route's first request, bounded in bytes.

A pod becomes ready without loading any module (a store of 10,000 tenants must not need
10,000 loaded modules); a module is fetched, verified and deserialized (or compiled) when a
request first needs it, then kept here, least recently used first out once the loaded modules
take more than `max_bytes`. The artifact cache on disk (modules.py) stays the second level: an
evicted module loads again in milliseconds.

Exactly one load runs per module however many first requests arrive at once (single flight):
the load runs in a thread started by a system task, so a request that gives up (its deadline)
does not cancel it for the others, and the next request finds the module loaded. A request
waits at most until its deadline, then answers 503 with Retry-After (`ModuleLoading`).

Everything but the load itself and `keep_only` (a reload's thread) runs on the event loop;
one uncontended lock guards the LRU against `keep_only`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .errors import ModuleLoading, ModuleUnavailable, SupervisorError
from .sandbox import PreparedModule

log = logging.getLogger("supervisor.modules")

DEFAULT_MAX_BYTES = 1024**3
"""`--module-cache-bytes`: 1 GiB of loaded modules per worker, ~55 CPython-for-WASI artifacts
(18 MB each) or thousands of small handlers; a worker's other memory is ~60 MB."""
LOADING_RETRY_AFTER_S = 1
"""Retry-After of a request whose module was still loading at its deadline: the load goes on,
and a small module's takes milliseconds, a large one's compile seconds."""
FAILED_RETRY_AFTER_S = 1
"""Retry-After of a module that could not be loaded: the next request tries again."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """A module ready to run, and what it costs to hold."""

    prepared: PreparedModule
    size_bytes: int  # its artifact's size (the native code mapped), or its binary's
    load_s: float  # to fetch, verify and deserialize it, or to compile it
    compiled: bool  # no verified artifact was found: it was compiled


@dataclass(frozen=True, slots=True, eq=False)
class ModuleRef:
    """How to load one module: by content, so tenants sharing a module load it once."""

    sha256: str
    name: str  # as its tenant wrote it, for messages
    load: Callable[[], Loaded]  # blocking: fetch, verify, deserialize (or compile), link


class _Flight:
    """One load in progress, awaited by every request that wants the module meanwhile."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None  # why it failed (each waiter raises its own error)


class LoadedModules:
    """An LRU of loaded modules bounded in bytes, with one load at a time per module."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # sha256, oldest use first
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.loads = 0  # loads that finished (compiled or from an artifact)
        self.load_failures = 0
        self.load_seconds = 0.0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._loaded)

    def peek(self, sha256: str) -> Loaded | None:
        """The loaded module, without marking it used (metrics)."""
        return self._loaded.get(sha256)

    def get(self, sha256: str) -> PreparedModule | None:
        """The loaded module, now the most recently used; None if it is not loaded."""
        with self._lock:
            loaded = self._loaded.get(sha256)
            if loaded is None:
                return None
            self._loaded.move_to_end(sha256)
            return loaded.prepared

    def keep_only(self, live: set[str]) -> None:
        """Unload the modules no tenant serves any more (a reload dropped them): held, their
        artifacts could never be collected. Any thread."""
        with self._lock:
            for sha256 in [sha for sha in self._loaded if sha not in live]:
                self.bytes -= self._loaded.pop(sha256).size_bytes

    async def load(self, ref: ModuleRef, *, deadline: float) -> PreparedModule:
        """The module, loaded now if no other request is loading it; waits until `deadline`
        (trio time) at most. Raises ModuleLoading past it, ModuleUnavailable if it failed."""
        prepared = self.get(ref.sha256)
        if prepared is not None:
            return prepared
        flight = self._flights.get(ref.sha256)
        if flight is None:
            flight = self._flights[ref.sha256] = _Flight()
            trio.lowlevel.spawn_system_task(self._run_load, ref, flight, name=f"load {ref.name}")
        with trio.move_on_at(deadline):
            await flight.done.wait()
        if not flight.done.is_set():
            raise ModuleLoading(
                f"module {ref.name} is still loading; retry shortly",
                retry_after=LOADING_RETRY_AFTER_S,
            )
        prepared = self.get(ref.sha256)
        if flight.error is not None or prepared is None:  # failed, or cancelled (shutdown)
            raise ModuleUnavailable(
                f"module {ref.name} could not be loaded; see the server log",
                retry_after=FAILED_RETRY_AFTER_S,
            )
        return prepared

    async def _run_load(self, ref: ModuleRef, flight: _Flight) -> None:
        started = time.perf_counter()
        try:
            loaded = await trio.to_thread.run_sync(ref.load)
        except SupervisorError as exc:
            flight.error = exc.message
            log.error("module %s could not be loaded: %s", ref.name, exc.message)
        except Exception as exc:  # a bug or an I/O fault: the request answers, the log says
            log.exception("loading module %s failed", ref.name)
            flight.error = type(exc).__name__
        else:
            self._insert(ref.sha256, loaded)
            self.loads += 1
            load_s = time.perf_counter() - started
            self.load_seconds += load_s
            log.info(
                "module %s loaded in %.1fms (%s, %d bytes)",
                ref.name,
                load_s * 1000,
                "compiled" if loaded.compiled else "from its artifact",
                loaded.size_bytes,
            )
        finally:
            if flight.error is not None:
                self.load_failures += 1
            del self._flights[ref.sha256]
            flight.done.set()

    def _insert(self, sha256: str, loaded: Loaded) -> None:
        """Add a module, then evict the least recently used ones over the bound (never the
        one just loaded: a module larger than the bound is still served, alone)."""
        with self._lock:
            old = self._loaded.pop(sha256, None)
            if old is not None:
                self.bytes -= old.size_bytes
            self._loaded[sha256] = loaded
            self.bytes += loaded.size_bytes
            evicted = []
            while self.bytes > self.max_bytes and len(self._loaded) > 1:
                evicted.append(self._loaded.popitem(last=False))
                self.bytes -= evicted[-1][1].size_bytes
        for evicted_sha, module in evicted:
            self.evictions += 1
            log.info("module %s evicted (%d bytes)", evicted_sha[:12], module.size_bytes)
