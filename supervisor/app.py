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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from . import loaded_modules, malloc, server, store
from .admin import DEFAULT_COMPILE_THREADS, AdminApi
from .admission import Admission
from .artifacts import ArtifactBucket, ArtifactKeys, FileArtifactBucket
from .auth import Authenticator
from .errors import ConfigError
from .gateway import Gateway, StderrSink
from .guest_threads import GuestThreads
from .loaded_modules import LoadedModules
from .metrics import Metrics
from .modules import DEFAULT_MAX_BYTES, DEFAULT_MIN_AGE_S, ArtifactCache
from .outbound import client as outbound_client
from .pod_limits import PodCounters
from .sandbox import Sandbox
from .store.settings import StoreSettings
from .store.uploads import UploadStore, referenced
from .tenants import WATCH_INTERVAL_S, TenantRegistry

log = logging.getLogger("supervisor.app")

UPLOADS_GC_INTERVAL_S = 3600.0
"""How often a pod sweeps the shared store of module bytes (each sweep reads every manifest)."""
STORE_WAIT_S = 5.0
"""How long start-up waits for a NATS store's manifests before it serves without them (and
says so in the log and `/healthz`); they load when the store answers."""
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
compile children's pipes, a worker's restart."""
METRICS_MAX_CONNECTIONS = 16
"""Scrapers of `/metrics` at once: a few Prometheus replicas and an adapter."""
SHARED_ARTIFACTS_FOLDER = ".artifacts"
SWEEP_INTERVAL_S = 600.0
"""How often a process sweeps the shared artifacts (each pod does: a sweep is idempotent)."""
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
    artifact_keys: ArtifactKeys | None = None  # seal shared artifacts; None: no sharing
    artifacts_dir: Path | None = None  # the store's shared artifacts; None: under tenants_dir

    def shared_artifacts_dir(self) -> Path:
        """The `file:` store's artifact area: its own folder, never a tenant's (a tenant's
        name never starts with a dot)."""
        return self.artifacts_dir or self.tenants_dir / SHARED_ARTIFACTS_FOLDER

    store: StoreSettings | None = None  # where uploads live; None: file:<tenants_dir>
    # `wagi` mode (wagi_cli.py): one tenant served at `/`, the Host given to requests without
    # one, and the folder module and volume paths resolve against with no containment.
    root_tenant: str | None = None
    default_host: str = ""
    operator_root: Path | None = None
    guest_stderr: StderrSink | None = None  # also given each run's stderr (--log-dir)


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
    on_serving: Callable[[], None] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or `shutdown` is set), then drain and return.

    A worker of `serve --workers N` (workers.py) passes the sockets its supervisor bound (the
    serving port; a private socket for its `/metrics`) and the pod-wide tenant counts.

    The server accepts (and `on_serving` is called) once the policies are read; the tenants
    are built while it serves, and `task_status.started` is called once they all are (a
    request for one not built yet waits for it: tenants.py).
    """
    malloc.return_large_buffers_to_the_os()
    with Sandbox(max_instances=2 * config.slots + LOADING_INSTANCES) as sandbox:
        store_settings = config.store or StoreSettings(f"file:{config.tenants_dir}")
        uploads = store_settings.open(config.cache_dir)
        cache = ArtifactCache(
            config.cache_dir,
            sandbox.engine,
            sandbox.settings,
            sandbox.code,
            max_bytes=config.cache_max_bytes,
            min_age_s=config.cache_min_age_s,
            bucket=_artifact_bucket(config, store_settings, uploads),
            keys=config.artifact_keys,
        )
        if cache.shared is None:
            log.info(
                "shared artifacts off: no artifact key (--artifact-key-file or"
                " $SUPERVISOR_ARTIFACT_KEY); every pod compiles what its own cache lacks"
            )
        else:
            log.info(
                "shared artifacts in %s (engine %s), sealed with key %s",
                store_settings.url,
                cache.fingerprint,
                config.artifact_keys.signing_id,
            )
        changes = store.open_change_counter(config.cache_dir)  # shared by the pod's workers
        registry = TenantRegistry(
            config.tenants_dir,
            config.policies_dir,
            sandbox,
            cache,
            changes,
            insecure_registries=config.insecure_registries,
            uploads=uploads,
            operator_root=config.operator_root,
            loaded=LoadedModules(config.module_cache_bytes),
        )
        started = time.perf_counter()
        async with trio.open_nursery() as reading:
            if not store_settings.is_file:  # the manifests' replay, while policies are read
                reading.start_soon(_wait_for_manifests, uploads, registry)
            served = await trio.to_thread.run_sync(registry.read_policies)
        log.info(
            "read %d policies in %.2fs; %d errors",
            served,
            time.perf_counter() - started,
            len(registry.state.errors),
        )
        server_config = replace(
            config.server, max_connections=_connection_limit(config.server, config.slots)
        )
        admission = Admission(slots=config.slots, global_queue=config.global_queue, pod=pod)
        guest_threads = GuestThreads(config.slots)
        metrics = Metrics(admission, registry, tenants=config.metrics_tenants)
        gateway = Gateway(registry, sandbox, admission, guest_threads, metrics)
        gateway.root_tenant, gateway.default_host = config.root_tenant, config.default_host
        gateway.guest_stderr = config.guest_stderr
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
            nursery.start_soon(_collect_artifacts, cache, registry)
            if not store_settings.is_file:  # a file store collects under each update's lock
                nursery.start_soon(_collect_uploads, uploads)
            nursery.start_soon(_close_when_cancelled, uploads)
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
                        replace(
                            server_config,
                            max_connections=METRICS_MAX_CONNECTIONS,
                            tls_cert=None,  # scraped in the cluster, plain HTTP
                            tls_key=None,
                        ),
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
                scheme = "http" if server_config.tls_cert is None else "https"
                log.info("serving on %s://%s:%d", scheme, config.host, port)
                if on_serving is not None:
                    on_serving()
                await _build_tenants(registry)
                task_status.started(RunningApp(port, metrics_port, registry, admission, shutdown))
            # `serve` returned: shutdown was asked and in-flight requests are drained.
            nursery.cancel_scope.cancel()
        # Every guest has ended by now (a caller waits for its guest), so this joins at once.
        guest_threads.close()
        registry.outbound.close()
        log.info("stopped")


async def _wait_for_manifests(uploads: UploadStore, registry: TenantRegistry) -> None:
    """Ready once the manifests are read; a store that is down is said, not waited for."""
    if not await trio.to_thread.run_sync(uploads.wait_synced, STORE_WAIT_S):
        log.warning("%s; serving what is cached until it answers", registry.not_ready())


async def _build_tenants(registry: TenantRegistry) -> None:
    """Build every tenant while the server serves. No module is loaded: each loads on its
    route's first request (loaded_modules.py), and `_routes` never learned are learned by the
    first `watch` reload."""
    started = time.perf_counter()
    state = await registry.fill()
    log.info(
        "read %d tenants (%d routes) in %.2fs, no module loaded; %d errors",
        len(state.tenants),
        sum(len(tenant.routes) for tenant in state.tenants.values()),
        time.perf_counter() - started,
        len(state.errors),
    )


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
    outbound = outbound_client.MAX_CONNECTIONS  # guests' outbound HTTP, in use or kept alive
    reserved = open_now + guests + METRICS_MAX_CONNECTIONS + outbound + FDS_HEADROOM
    room = soft - reserved
    if room < MIN_CONNECTIONS:
        raise ConfigError(
            "RLIMIT_NOFILE",
            None,
            f"the soft limit of {soft} file descriptors leaves {room} for connections, fewer"
            f" than {MIN_CONNECTIONS}: {reserved} are reserved ({open_now} open, {guests} for"
            f" {slots} slots, {METRICS_MAX_CONNECTIONS} for /metrics, {outbound} for outbound"
            f" HTTP, {FDS_HEADROOM} headroom);"
            " raise it (ulimit -n) or lower --slots",
        )
    limit = min(config.max_connections, room)
    log.info(
        "connections: at most %d (RLIMIT_NOFILE %d, %d reserved: %d open, %d for %d slots,"
        " %d for /metrics, %d for outbound HTTP, %d headroom), %d idle per client",
        limit,
        soft,
        reserved,
        open_now,
        guests,
        slots,
        METRICS_MAX_CONNECTIONS,
        outbound,
        FDS_HEADROOM,
        config.max_idle_per_client,
    )
    return limit


async def _collect_artifacts(cache: ArtifactCache, registry: TenantRegistry) -> None:
    """Lease this process's artifacts and collect unused ones, forever (cancel to stop); every
    SWEEP_INTERVAL_S, sweep the store's shared artifacts that no module names any more."""
    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
    while True:
        await trio.sleep(cache.collect_interval())
        try:
            await trio.to_thread.run_sync(cache.collect)
            if cache.shared is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                live = await trio.to_thread.run_sync(_named_modules, registry)
                await trio.to_thread.run_sync(cache.shared.sweep, live)
        except Exception:
            log.exception("artifact cache collection failed")


def _named_modules(registry: TenantRegistry) -> set[str]:
    """The mark of the shared artifacts' sweep: the sha256 of every module a manifest of the
    store names (current versions and those kept for rollback), whichever the store, and of
    every module `modules.toml` serves."""
    uploads = registry.uploads
    live = referenced(uploads.read(tenant).manifest for tenant in uploads.tenants())
    live.update(
        module.sha256
        for tenant in registry.state.tenants.values()
        for module in tenant.modules.values()
    )
    return live


def _artifact_bucket(
    config: AppConfig, settings: StoreSettings, uploads: UploadStore
) -> ArtifactBucket:
    """Where the store keeps shared artifacts: a folder of the `file:` store's own, or buckets
    beside the manifests of a NATS store, on its connection."""
    if settings.is_file:
        return FileArtifactBucket(config.shared_artifacts_dir())
    from .store.nats_artifacts import NatsArtifactBucket  # nats-py only when the store is NATS
    from .store.nats_store import NatsStore

    assert isinstance(uploads, NatsStore)  # what a nats:// setting opens
    return NatsArtifactBucket(
        uploads.connection, prefix=settings.prefix, replicas=settings.replicas
    )


async def _close_when_cancelled(uploads: UploadStore) -> None:
    """Close the store (its connection and local copies) when the app's nursery ends, however
    it ends: a shutdown, an error, or a test's teardown."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(uploads.close)


async def _collect_uploads(uploads: UploadStore) -> None:
    """Sweep module bytes no manifest names from the shared store, forever (cancel to stop).

    Every pod sweeps; deleting an object twice is harmless, and the minimum age keeps a sweep
    from racing an upload."""
    while True:
        await trio.sleep(UPLOADS_GC_INTERVAL_S)
        try:
            removed = await trio.to_thread.run_sync(uploads.collect_garbage)
        except Exception:
            log.exception("store garbage collection failed")
        else:
            if removed:
                log.info("store: removed %d module objects no manifest names", len(removed))


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
