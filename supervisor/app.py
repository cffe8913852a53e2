"""Wires one worker process together: sandbox, artifact cache, registry, admission, server.

`run` is what `wasm-supervisor serve` calls, and what the tests start in their own nursery
(`await nursery.start(app.run, config)` gives the bound port), so tests exercise the very
assembly that production runs.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import server, store
from .admin import DEFAULT_COMPILE_THREADS, AdminApi
from .admission import Admission
from .auth import Authenticator
from .gateway import Gateway
from .guest_threads import GuestThreads
from .metrics import Metrics
from .modules import ArtifactCache
from .pod_limits import PodCounters
from .sandbox import Sandbox
from .tenants import WATCH_INTERVAL_S, TenantRegistry

log = logging.getLogger("supervisor.app")

DEFAULT_SLOTS = 16
"""Guests running at once: threads help CPU-bound and sleeping guests, not short ones (GIL)."""
DEFAULT_GLOBAL_QUEUE = 256
LOADING_INSTANCES = 8
"""Stores used outside request slots at once: `_routes` calls while tenants load."""


def default_cache_dir() -> Path:
    """Under the user's cache directory, never inside `tenants/` (tenants must not write it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wasm-supervisor"


@dataclass(frozen=True)
class AppConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    tenants_dir: Path = Path("tenants")
    policies_dir: Path = Path("policies")
    cache_dir: Path = field(default_factory=default_cache_dir)
    slots: int = DEFAULT_SLOTS
    global_queue: int = DEFAULT_GLOBAL_QUEUE
    watch_interval_s: float = WATCH_INTERVAL_S
    server: server.ServerConfig = field(default_factory=server.ServerConfig)
    handle_signals: bool = True
    admin_token_sha256: str | None = None  # the operator's admin token, hashed (never the token)
    compile_threads: int = DEFAULT_COMPILE_THREADS  # admin uploads compiled at once
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None  # None: no metrics listener (the CLI always opens one)
    metrics_tenants: frozenset[str] = frozenset()  # tenants with their own metric label


@dataclass
class RunningApp:
    """What `run` hands to `task_status.started`: enough for a caller (or a test) to drive it."""

    port: int
    metrics_port: int | None  # the bound metrics port, None without a metrics listener
    registry: TenantRegistry
    admission: Admission
    shutdown: trio.Event


async def run(
    config: AppConfig,
    *,
    listeners: list[trio.SocketListener] | None = None,
    metrics_listeners: list[trio.SocketListener] | None = None,
    pod: PodCounters | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or `shutdown` is set), then drain and return.

    A worker of `serve --workers N` (workers.py) passes the sockets its supervisor bound (the
    serving port; a private socket for its `/metrics`) and the pod-wide tenant counts.
    """
    with Sandbox(max_instances=2 * config.slots + LOADING_INSTANCES) as sandbox:
        cache = ArtifactCache(config.cache_dir, sandbox.engine, sandbox.settings)
        changes = store.open_change_counter(config.cache_dir)  # shared by the pod's workers
        registry = TenantRegistry(config.tenants_dir, config.policies_dir, sandbox, cache, changes)
        started = time.perf_counter()
        state = await trio.to_thread.run_sync(registry.reload)
        log.info(
            "loaded %d tenants (%d routes) in %.2fs; compiled %d, cache hits %d; %d errors",
            len(state.tenants),
            sum(len(tenant.routes) for tenant in state.tenants.values()),
            time.perf_counter() - started,
            cache.misses,
            cache.hits,
            len(state.errors),
        )
        admission = Admission(slots=config.slots, global_queue=config.global_queue, pod=pod)
        guest_threads = GuestThreads(config.slots)
        metrics = Metrics(admission, registry, tenants=config.metrics_tenants)
        gateway = Gateway(registry, sandbox, admission, guest_threads, metrics)
        authenticator = Authenticator(
            config.admin_token_sha256,
            lambda: ((name, tenant.policy) for name, tenant in registry.state.tenants.items()),
        )
        gateway.admin = AdminApi(
            registry,
            admission,
            authenticator,
            gateway.usage,
            compile_threads=config.compile_threads,
        ).handle
        if listeners is None:
            listeners = await server.open_listeners(config.host, config.port)
        port = server.bound_port(listeners)
        metrics_port = None
        if metrics_listeners is None and config.metrics_port is not None:
            metrics_listeners = await server.open_listeners(
                config.metrics_host, config.metrics_port
            )
            metrics_port = server.bound_port(metrics_listeners)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            if config.handle_signals:
                nursery.start_soon(_handle_signals, registry, shutdown)
            nursery.start_soon(registry.watch, config.watch_interval_s)
            if pod is not None:
                nursery.start_soon(admission.poll_pod)
            if metrics_listeners is not None:
                # Its own shutdown event, never set: /metrics keeps answering while the
                # serving port drains, and stops with the nursery below.
                await nursery.start(
                    functools.partial(
                        server.serve,
                        metrics.handle,
                        metrics_listeners,
                        config.server,
                        shutdown=trio.Event(),
                    )
                )
                if metrics_port is not None:
                    log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics_port)
            async with trio.open_nursery() as serving:
                await serving.start(
                    functools.partial(
                        server.serve, gateway.handle, listeners, config.server, shutdown=shutdown
                    )
                )
                log.info("serving on http://%s:%d", config.host, port)
                task_status.started(RunningApp(port, metrics_port, registry, admission, shutdown))
            # `serve` returned: shutdown was asked and in-flight requests are drained.
            nursery.cancel_scope.cancel()
        # Every guest has ended by now (a caller waits for its guest), so this joins at once.
        guest_threads.close()
        registry.outbound.close()
        log.info("stopped")


async def _handle_signals(registry: TenantRegistry, shutdown: trio.Event) -> None:
    """SIGTERM/SIGINT drain and stop; SIGHUP reloads every tenant now."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading policies and modules")
                await trio.to_thread.run_sync(lambda: registry.reload(force=True))
            else:
                log.info("%s: draining", signal.Signals(signum).name)
                shutdown.set()
