"""Wires one worker process together: sandbox, artifact cache, registry, admission, server.

`run` is what `wasm-supervisor serve` calls, and what the tests start in their own nursery
(`await nursery.start(app.run, config)` gives the bound port), so tests exercise the very
assembly that production runs.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from . import loaded_modules, server, store
from .admin import DEFAULT_COMPILE_THREADS, AdminApi
from .admission import Admission
from .auth import Authenticator
from .errors import ConfigError
from .gateway import Gateway
from .guest_threads import GuestThreads
from .loaded_modules import LoadedModules
from .metrics import Metrics
from .modules import DEFAULT_MAX_BYTES, DEFAULT_MIN_AGE_S, ArtifactCache
from .pod_limits import PodCounters
from .sandbox import Sandbox
from .tenants import WATCH_INTERVAL_S, TenantRegistry

log = logging.getLogger("supervisor.app")

DEFAULT_SLOTS = 16
"""Guests running at once: threads help CPU-bound and sleeping guests, not short ones (GIL)."""
DEFAULT_GLOBAL_QUEUE = 256
LOADING_INSTANCES = 8
"""Stores used outside request slots at once: `_routes` calls while tenants load."""

# Connections get the file descriptors RLIMIT_NOFILE allows, less what the rest of the process
# needs, so that accept never meets EMFILE and a guest never fails to open its volume.
FDS_PER_SLOT = 8
"""A running guest holds one descriptor per preopened volume; 8 covers a route's usual few."""
FDS_HEADROOM = 64
"""Beyond what is open once the tenants are loaded (listeners, logs, one per loaded artifact,
which stays mapped): modules loaded later, admin uploads and cache files being written,
compile children's pipes, a worker's restart, and outbound HTTP pools to come."""
METRICS_MAX_CONNECTIONS = 16
"""Scrapers of `/metrics` at once: a few Prometheus replicas and an adapter."""
MIN_CONNECTIONS = 16
"""Fewer connections than this is a misconfiguration: refuse to start and say why."""


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
    cache_max_bytes: int = DEFAULT_MAX_BYTES  # the artifact cache's bound on disk
    cache_min_age_s: float = DEFAULT_MIN_AGE_S  # never collected younger than this
    module_cache_bytes: int = loaded_modules.DEFAULT_MAX_BYTES  # loaded modules, per worker
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
    insecure_registries: frozenset[str] = frozenset()  # host[:port]s pulled over plain HTTP


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
        cache = ArtifactCache(
            config.cache_dir,
            sandbox.engine,
            sandbox.settings,
            sandbox.code,
            max_bytes=config.cache_max_bytes,
            min_age_s=config.cache_min_age_s,
        )
        changes = store.open_change_counter(config.cache_dir)  # shared by the pod's workers
        registry = TenantRegistry(
            config.tenants_dir,
            config.policies_dir,
            sandbox,
            cache,
            changes,
            insecure_registries=config.insecure_registries,
            loaded=LoadedModules(config.module_cache_bytes),
        )
        started = time.perf_counter()
        # No module is loaded: each loads on its route's first request (loaded_modules.py),
        # and `_routes` never learned are learned by the first `watch` reload.
        state = await trio.to_thread.run_sync(
            functools.partial(registry.reload, learn_routes=False)
        )
        log.info(
            "read %d tenants (%d routes) in %.2fs, no module loaded; %d errors",
            len(state.tenants),
            sum(len(tenant.routes) for tenant in state.tenants.values()),
            time.perf_counter() - started,
            len(state.errors),
        )
        server_config = replace(
            config.server, max_connections=_connection_limit(config.server, config.slots)
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
            nursery.start_soon(_collect_artifacts, cache)
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
                        replace(server_config, max_connections=METRICS_MAX_CONNECTIONS),
                        shutdown=trio.Event(),
                    )
                )
                if metrics_port is not None:
                    log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics_port)
            async with trio.open_nursery() as serving:
                await serving.start(
                    functools.partial(
                        server.serve, gateway.handle, listeners, server_config, shutdown=shutdown
                    )
                )
                log.info("serving on http://%s:%d", config.host, port)
                task_status.started(RunningApp(port, metrics_port, registry, admission, shutdown))
            # `serve` returned: shutdown was asked and in-flight requests are drained.
            nursery.cancel_scope.cancel()
        # Every guest has ended by now (a caller waits for its guest), so this joins at once.
        guest_threads.close()
        log.info("stopped")


def _connection_limit(config: server.ServerConfig, slots: int) -> int:
    """`max_connections`, lowered to what RLIMIT_NOFILE (soft) leaves once the descriptors
    open now (the tenants loaded), the guests', /metrics' and `FDS_HEADROOM` are set aside.

    Raises ConfigError when that leaves fewer than `MIN_CONNECTIONS`.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return config.max_connections
    open_now = len(os.listdir("/proc/self/fd"))
    guests = slots * FDS_PER_SLOT
    reserved = open_now + guests + METRICS_MAX_CONNECTIONS + FDS_HEADROOM
    room = soft - reserved
    if room < MIN_CONNECTIONS:
        raise ConfigError(
            "RLIMIT_NOFILE",
            None,
            f"the soft limit of {soft} file descriptors leaves {room} for connections, fewer"
            f" than {MIN_CONNECTIONS}: {reserved} are reserved ({open_now} open, {guests} for"
            f" {slots} slots, {METRICS_MAX_CONNECTIONS} for /metrics, {FDS_HEADROOM} headroom);"
            " raise it (ulimit -n) or lower --slots",
        )
    limit = min(config.max_connections, room)
    log.info(
        "connections: at most %d (RLIMIT_NOFILE %d, %d reserved: %d open, %d for %d slots,"
        " %d for /metrics, %d headroom), %d idle per client",
        limit,
        soft,
        reserved,
        open_now,
        guests,
        slots,
        METRICS_MAX_CONNECTIONS,
        FDS_HEADROOM,
        config.max_idle_per_client,
    )
    return limit


async def _collect_artifacts(cache: ArtifactCache) -> None:
    """Lease this process's artifacts and collect unused ones, forever (cancel to stop)."""
    while True:
        await trio.sleep(cache.collect_interval())
        try:
            await trio.to_thread.run_sync(cache.collect)
        except Exception:
            log.exception("artifact cache collection failed")


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
