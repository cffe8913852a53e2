"""The tenant registry: for each tenant, its policy, its routes and its prepared modules.

A tenant is served when `policies/<name>.toml` validates; its routes come from
`tenants/<name>/modules.toml` (WAGI format, the operator's), the tenant's manifest (the named
modules the admin API uploads, in the store of uploads: store/uploads.py) and the routes each
module declares through `_routes` (declared_routes.py: learned once per sha256 and stored, so
loading a tenant never runs guest code). A route claimed by two owners (modules.toml and a
named module, or two named modules) is a `RouteConflict`; more routes than `max_routes` is a
ConfigError naming it.
The registry's whole state is one immutable `RegistryState`, swapped in a single assignment,
so a request reads a consistent view without locks.

Reload is incremental and never loses service: the policy folder is parsed again only when
the `stat` of one of its entries changes, and a tenant is rebuilt only when its policy differs
or the `stat` of one of its own files (modules.toml, manifest.json, each module) changes. A
tenant that fails to rebuild keeps its last good state while the error is reported with file,
key and reason, and is tried again with backoff (at once when its files change again). One
broken tenant never stops the others.

A pod is ready once its policies are read (`read_policies`, every file checked, errors logged
and counted): building the tenants (modules.toml, manifests, route tables: ~0.3 s for 1,000
tenants here) goes on while it serves (`fill`), and a request for a tenant not built yet has it
built next and waits for it.

A worker that keeps serving a tenant from an older manifest than the one on disk (the pod, or
another pod, committed it and this worker failed to load it) has split from the pod:
`divergence` says so in one line, and `/healthz` answers 503 with it until a retry converges.

Everything but `watch` blocks (file I/O, compiling): call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import trio
import wasmtime

from . import oci, policies, store, unknown_keys
from .admission import TenantLimits
from .compiler import CompileLimits, check_compile_bounds, check_compile_bounds_of
from .declared_routes import (
    ROUTES_EXPORT,
    Declared,
    RoutesCache,
    RoutesRefused,
    check_route_count,
    run_routes_export,
)
from .errors import ConfigError, ModuleRejected, RouteConflict, SupervisorError
from .loaded_modules import Loaded, LoadedModules, ModuleRef
from .modules import ArtifactCache, CompiledModule, to_binary
from .outbound import abi as outbound_abi
from .outbound.client import TenantClients
from .outbound.rules import parse_allow_list
from .policies import Policy
from .routing import (
    Route,
    RouteError,
    RouteTable,
    join_route,
    validate_pattern,
)
from .sandbox import GuestLimits, PreparedModule, Sandbox, Volume
from .store.file_store import FileStore
from .store.uploads import UploadStore
from .wasm_binary import WasmInfo, disallowed_imports, inspect

log = logging.getLogger("supervisor.tenants")
T = TypeVar("T")

MODULES_FILE = "modules.toml"
PULLED_MODULES_DIR = "oci"
"""Under the pod's cache folder: the manifests and layers of `oci:` modules, by digest."""
DEFAULT_ENTRYPOINT = "_start"
WATCH_INTERVAL_S = 1.0
"""How often files are checked for changes; pods sharing a folder see uploads within this."""
YIELD_EVERY_S = 0.0005
"""A reload offers the GIL this often: the event loop waits about this long at worst."""
CATCH_UP_LOCK_WAIT_S = 0.05
"""How long a request's catch-up waits for a reload already running (a poll of unchanged
tenants takes milliseconds); past it, the request is served from the state in force and the
next poll brings the change."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 32.0
"""A tenant that failed to rebuild from unchanged files is tried again after RETRY_FIRST_S,
doubling up to RETRY_MAX_S: a fault that goes away (a file another pod is still writing, a
full disk, no free descriptors) is outgrown, and one that stays costs a rebuild a half-minute,
not one a poll."""

_MODULE_KEYS = frozenset(
    {"route", "module", "entrypoint", "argv", "volumes", "allowed_hosts", "http_max_concurrency"}
)
_OFFERED_IMPORTS = frozenset((outbound_abi.MODULE, name) for name in outbound_abi.IMPORTS)


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """One `[[module]]` entry of modules.toml, validated."""

    route: str
    module: str
    entrypoint: str = DEFAULT_ENTRYPOINT
    argv: str | None = None
    volumes: Mapping[str, str] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] | None = None  # outbound HTTP patterns; None: no requests
    http_max_concurrency: int | None = None  # outbound responses a guest may hold at once
    declared_routes: store.DeclaredRoutes | None = None  # stored at upload; None: learn them


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """What a matched route runs."""

    module_name: str
    sha256: str
    module: ModuleRef  # loaded on the route's first request (loaded_modules.py)
    entrypoint: str
    argv_template: str | None
    volumes: tuple[Volume, ...]
    owner: str | None = None  # the named module (manifest.json) it belongs to; None: modules.toml
    outbound: outbound_abi.Grant | None = None  # None: every outbound request is refused


@dataclass(frozen=True, slots=True)
class Tenant:
    """Everything the request path needs of one tenant, computed once per (re)load."""

    name: str
    policy: Policy
    routes: RouteTable[RouteTarget]
    guest_limits: GuestLimits
    admission_limits: TenantLimits
    modules: Mapping[str, ModuleRef]  # module path as written -> how to load it
    routes_pending: bool = False
    """A modules.toml module's `_routes` was never run: its own route is served, its declared
    routes come with the background reload that learns them (`reload(learn_routes=True)`)."""


@dataclass(frozen=True)
class RegistryState:
    tenants: Mapping[str, Tenant]
    exact_hosts: Mapping[str, str]  # host -> tenant
    wildcard_hosts: tuple[tuple[str, str], ...]  # (".suffix", tenant), longest suffix first
    errors: Mapping[str, str]  # file or tenant -> message of the last failed load

    def tenant_for_host(self, host: str) -> Tenant | None:
        """The tenant whose policy lists `host` (already lower-cased, no port)."""
        name = self.name_for_host(host)
        return None if name is None else self.tenants.get(name)

    def name_for_host(self, host: str) -> str | None:
        name = self.exact_hosts.get(host)
        if name is None:
            for suffix, tenant in self.wildcard_hosts:
                if host.endswith(suffix):
                    return tenant
        return name


StatKey = tuple[int, int, int]
"""A file's (mtime in ns, size, inode): a file edited in place or replaced by a rename (by this
pod or another sharing the folder) changes one of them, unless an edit keeps the size and the
mtime is put back (SIGHUP forces a full reload for that)."""


@dataclass(frozen=True, slots=True)
class WatchedFiles:
    """The files a tenant was built from, as ready-made str paths, and their `stat` then.

    The poll re-stats only these. With 1,000 unchanged tenants it took ~38 ms every second,
    ~27 ms of it in Python holding the GIL (which the serving event loop waits for), mostly
    building Path objects and stat-ing each tenant's policy file and the defaults again, which
    the policy folder's key already covers; now ~13 ms, ~6 ms of it in Python.
    """

    paths: tuple[str, ...]
    keys: tuple[StatKey | None, ...]

    def unchanged(self) -> bool:
        return self.keys == _stat_keys(self.paths)


class _Deferred(Exception):
    """A tenant's change needs compiling or guest code: left to the background reload."""


@dataclass(frozen=True, slots=True)
class _Inspected:
    """A modules.toml module file as read once per `stat`: enough to build its tenant (its
    routes and entrypoints are checked) without compiling or loading it."""

    sha256: str  # of its binary
    size: int
    info: WasmInfo

    @property
    def exports(self) -> frozenset[str]:
        return frozenset(export.name for export in self.info.exports)


@dataclass(frozen=True, slots=True)
class _Retry:
    """When a tenant that failed to rebuild is tried again, unless its files change first."""

    files: tuple  # the stat keys of the files it was built from at the failure
    at: float  # time.monotonic()
    delay_s: float


EMPTY_STATE = RegistryState(MappingProxyType({}), MappingProxyType({}), (), MappingProxyType({}))


class _Filling:
    """The first build of every tenant, running while the pod serves. The building thread
    writes `built` and takes the names of `wanted` first; the event loop reads `built` and
    adds to `wanted`."""

    def __init__(self, names: frozenset[str], exact: dict, wildcard: list, errors: Mapping) -> None:
        self.names = names  # every tenant with a valid policy: each is built, or fails
        self.built: dict[str, Tenant] = {}
        self.failed: set[str] = set()  # built and refused (errors): not served
        # What `state` will hold, but the tenants: built ones are in `built`.
        self.state = RegistryState(
            MappingProxyType(self.built), MappingProxyType(exact), tuple(wildcard), errors
        )
        self.wanted: deque[str] = deque()  # asked for by requests, built next
        self.waiters: dict[str, trio.Event] = {}  # by name (event loop only)
        self.done = trio.Event()

    def order(self, names: Iterable[str]) -> Iterator[str]:
        """`names`, the wanted ones first as they come."""
        todo = dict.fromkeys(names)
        while todo:
            name = next(iter(todo))
            while self.wanted:
                asked = self.wanted.popleft()
                if asked in todo:
                    name = asked
                    break
            del todo[name]
            yield name

    def wake(self, name: str) -> None:
        """In the event loop: tenant `name` is built (or failed)."""
        event = self.waiters.pop(name, None)
        if event is not None:
            event.set()


def parse_modules_toml(
    data: Mapping, *, source: str, operator_paths: bool = False
) -> list[ModuleSpec]:
    """Validate a parsed modules.toml: every key WAGI reads; a likely typo of one is an error,
    any other unknown key is warned about once and ignored, as WAGI ignores it.

    `operator_paths` (`wagi` mode, whose file is the operator's): as in WAGI, a `module` may be
    a `file:` URL (made a path here) and a volume's folder any path, absolute or relative to
    the working directory. Otherwise both stay inside the tenant's folder and are refused
    here when they cannot."""
    _check_unknown_keys(source, "", data, {"module"})
    if "default_host" in data:
        unknown_keys.warn_once(source, "default_host", "WAGI never reads it; ignored")
    entries = data.get("module", [])
    if not isinstance(entries, list):
        raise ConfigError(source, "module", "must be an array of tables ([[module]])")
    specs = []
    for index, entry in enumerate(entries):
        where = f"module[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(source, where, "must be a table")
        _check_unknown_keys(source, f"{where}.", entry, _MODULE_KEYS | {"bindle_server"})
        if "bindle_server" in entry or str(entry.get("module", "")).startswith("bindle:"):
            key = "bindle_server" if "bindle_server" in entry else "module"
            raise ConfigError(
                source,
                f"{where}.{key}",
                "Bindle is gone (deprecated by WAGI, its server unmaintained): give the module"
                " as a file path or an oci: reference",
            )
        for key in ("route", "module"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(source, f"{where}.{key}", "required, a non-empty string")
        for key in ("entrypoint", "argv"):
            if key in entry and not isinstance(entry[key], str):
                raise ConfigError(source, f"{where}.{key}", "must be a string")
        try:
            validate_pattern(entry["route"])
        except RouteError as exc:
            raise ConfigError(source, f"{where}.route", str(exc)) from exc
        module = entry["module"]
        if module[:5].lower() == "file:":
            if not operator_paths:
                raise ConfigError(
                    source,
                    f"{where}.module",
                    "a file: URL is read only by `wasm-supervisor wagi`: a tenant's module is"
                    " a path inside its folder",
                )
            module = _file_url_path(source, f"{where}.module", module)
        if operator_paths:
            volumes = _operator_volumes(source, where, entry.get("volumes", {}))
        else:
            volumes = policies.parse_volumes(source, entry.get("volumes", {}))
        allowed_hosts = store.parse_allowed_hosts(
            entry.get("allowed_hosts"), source=source, key=f"{where}.allowed_hosts"
        )
        concurrency = entry.get("http_max_concurrency")
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ConfigError(
                source, f"{where}.http_max_concurrency", "must be an integer, at least 1"
            )
        specs.append(
            ModuleSpec(
                route=entry["route"],
                module=module,
                entrypoint=entry.get("entrypoint", DEFAULT_ENTRYPOINT),
                argv=entry.get("argv"),
                volumes=volumes,
                allowed_hosts=allowed_hosts,
                http_max_concurrency=concurrency,
            )
        )
    return specs


def _file_url_path(source: str, key: str, url: str) -> str:
    """The local path a `file:` URL names, as WAGI reads it (`Url::to_file_path`): no host but
    `localhost`; the path percent-decoded; query and fragment ignored."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            source,
            key,
            f"the file: URL {url!r} names the host {parts.netloc!r}: only a local file can be"
            " read (file:///abs/path.wasm, or a path relative to the working directory)",
        )
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))
    if not path.strip("/") or "\0" in path:
        raise ConfigError(source, key, f"the file: URL {url!r} names no file")
    return path if path.startswith("/") else "/" + path  # `file:x.wasm` is `file:///x.wasm`


def _operator_volumes(source: str, where: str, value: object) -> dict[str, str]:
    """`wagi` mode's volumes: guest path -> any host folder, absolute or relative to the
    working directory (`..` too), as WAGI opens them; the guest path as the policy's."""
    if not isinstance(value, Mapping):
        raise ConfigError(source, f"{where}.volumes", "must be a table")
    volumes = {}
    for guest, folder in value.items():
        # The policy's own check and normal form of the guest path (the folder a stand-in).
        (normal,) = policies.parse_volumes(source, {guest: "folder"})
        if normal in volumes:
            raise ConfigError(source, f"{where}.volumes", f"the guest path {normal!r} is twice")
        if not isinstance(folder, str) or not folder or "\0" in folder:
            raise ConfigError(
                source, f"{where}.volumes.{normal}", "the folder must be a non-empty path"
            )
        volumes[normal] = folder
    return volumes


def _check_unknown_keys(source: str, prefix: str, table: Mapping, known: set[str]) -> None:
    """A key within unknown_keys.TYPO_DISTANCE of a known one is an error naming it; any
    other unknown key is warned about once (`default_host` has its own warning)."""
    for key in table:
        if key in known or (not prefix and key == "default_host"):
            continue
        meant = unknown_keys.closest_key(key, known)
        if meant is not None:
            raise ConfigError(source, f"{prefix}{key}", f"unknown key (did you mean `{meant}`?)")
        unknown_keys.warn_once(
            source, f"{prefix}{key}", f"unknown key ignored (known: {', '.join(sorted(known))})"
        )


class TenantRegistry:
    """Loads tenants from two folders and keeps `state` current; reads are lock-free."""

    def __init__(
        self,
        tenants_dir: Path,
        policies_dir: Path,
        sandbox: Sandbox,
        cache: ArtifactCache,
        changes: store.ChangeCounter | None = None,
        insecure_registries: frozenset[str] = frozenset(),
        uploads: UploadStore | None = None,
        operator_root: Path | None = None,
        loaded: LoadedModules | None = None,
    ) -> None:
        self.tenants_dir = tenants_dir
        self.uploads = uploads if uploads is not None else FileStore(tenants_dir)
        """Manifests and module bytes (`--store`); `file:` the tenants folder by default."""
        # `wagi` mode: modules.toml paths are the operator's own files, resolved against this
        # folder (WAGI's working directory) and not confined to the tenant's folder.
        self.operator_root = operator_root
        self.policies_dir = policies_dir
        self.sandbox = sandbox
        self.cache = cache
        self.loaded = loaded if loaded is not None else LoadedModules()
        """The modules loaded in this process; the gateway loads a route's module there."""
        self._insecure_registries = insecure_registries
        self._pulled_modules: oci.PulledModules | None = None
        self.changes = changes  # the pod's admin change counter (store.py), if any
        self._changes_seen = changes.value() if changes is not None else 0
        self._catching_up = trio.Lock()
        self._learning = trio.Lock()
        self.state: RegistryState = EMPTY_STATE
        self.reload_errors = 0  # failed loads since start (a counter for metrics)
        self._watched: dict[str, WatchedFiles] = {}  # tenant -> its files when last built
        self._routes_output: dict[str, Declared] = {}  # sha256 -> `_routes` (modules.toml)
        self.routes_cache = RoutesCache(cache.directory)
        self._retries: dict[str, _Retry] = {}  # tenant -> its next try after a failure
        self.divergence: str | None = None
        """Why this worker does not serve what the pod committed (one line, no paths), or
        None: `/healthz` answers 503 with it."""
        self._inspected: dict[tuple, _Inspected] = {}  # (path, stat) -> modules.toml file
        self._by_content: dict[str, _Inspected] = {}  # SHA-256 of a file's bytes -> the same
        self._resolved_dirs: dict[Path, Path] = {}  # tenant folder -> resolved, this reload
        self._module_files: dict[str, tuple[str, ...]] = {}  # tenant -> files of its last build
        self._trio_token: trio.lowlevel.TrioToken | None = None  # set by `watch`
        self._store_event = trio.Event()
        self._lock = threading.Lock()
        self._policy_set: policies.PolicySet | None = None
        self._policy_key: tuple = ()
        self.outbound = TenantClients()  # kept-alive outbound pools and their stats, by tenant
        self._policy_retry = _Retry((), 0.0, 0.0)  # when a set with errors is parsed again
        self._filling: _Filling | None = None  # from `read_policies` to the end of `fill`

    @property
    def pulled_modules(self) -> oci.PulledModules:
        """The `oci:` modules' disk cache, made (and its client imported) on first use."""
        if self._pulled_modules is None:
            self._pulled_modules = oci.PulledModules(
                self.cache.directory.parent / PULLED_MODULES_DIR,
                insecure_registries=self._insecure_registries,
            )
        return self._pulled_modules

    def build_tenant(self, name: str, manifest: store.Manifest) -> Tenant:
        """Build served tenant `name` as it would be with `manifest`, without serving it.

        The admin API's dry run before it commits a manifest: what passes here loads. Raises
        ConfigError (RouteConflict for a route two owners claim). Blocking.
        """
        tenant = self.state.tenants.get(name)
        if tenant is None:
            raise ConfigError(name, None, "not a served tenant")
        return self._load_tenant(name, tenant.policy, manifest)

    def reload(
        self, *, force: bool = False, on_request_path: bool = False, learn_routes: bool = True
    ) -> RegistryState:
        """Rebuild every tenant whose inputs changed (all of them with `force`). Blocking.

        No module is loaded (a route's first request loads it), but `learn_routes` loads and
        runs the `_routes` of a modules.toml module whose routes were never learned; without
        it (the start: readiness never waits on modules) such a tenant serves its own routes
        and is marked `routes_pending` until a reload that learns them.

        `on_request_path`: for a request that waits (a catch-up). It waits for a reload
        already running only CATCH_UP_LOCK_WAIT_S, and rebuilds only the tenants that need
        neither reading modules nor guest code (an upload: routes stored); the others keep
        serving their old state until the background poll has built the new one.
        """
        if not self._lock.acquire(timeout=CATCH_UP_LOCK_WAIT_S if on_request_path else -1):
            # A long reload runs (compiling): the next poll brings the change. Seen, so the
            # requests that follow do not each wait again.
            log.info("catch-up: a reload is running; left to the background reload")
            if self.changes is not None:
                self._changes_seen = self.changes.value()
            return self.state
        try:
            return self._reload(force, on_request_path, learn_routes and not on_request_path)
        except Exception:
            # Nothing was rebuilt: every tenant is served as it was built.
            self.divergence = _divergence(list(self.state.tenants), self._watched)
            raise
        finally:
            self._lock.release()

    def declare_routes(self, module: CompiledModule, policy: Policy, *, name: str) -> Declared:
        """What an uploaded module's `_routes` declares, checked against `policy` (the upload
        stores it in the manifest). It runs only if the pod never saw this content. Raises
        ModuleRejected naming the limit. Blocking."""
        prepared = self._prepare(module, source=name)
        declared = self._learn_routes(module, prepared, policy, name)
        check_route_count(
            declared.routes, max_routes_per_module=policy.max_routes_per_module, name=name
        )
        for _, export in declared.routes:
            if export not in prepared.exports:
                raise ModuleRejected(
                    f"{name}: `_routes` names {export!r}, which the module does not export"
                )
        return declared

    def behind(self) -> bool:
        """True when another process of the pod committed an admin change since the last
        reload began (one memory read: the gateway asks on every request)."""
        return self.changes is not None and self.changes.value() != self._changes_seen

    async def catch_up(self) -> None:
        """Reload now, once for all the requests that found the registry `behind`.

        Loading an upload reads its stored routes and its compiled artifact: no guest code
        runs, and what would need compiling is left to `watch` (`reload(on_request_path=
        True)`). A reload that fails leaves the old state serving and `divergence` set;
        `watch` tries again.
        """
        async with self._catching_up:
            if self.behind():
                try:
                    await trio.to_thread.run_sync(
                        functools.partial(self.reload, on_request_path=True)
                    )
                except Exception:
                    log.exception("catch-up reload failed; serving the last good state")

    def store_changed(self) -> None:
        """The store's watch saw a manifest change: reload now. From any thread; never blocks."""
        token = self._trio_token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._store_event.set)

    def not_ready(self) -> str | None:
        """Why `/healthz` answers 503 (one line), or None: the store never read yet, or this
        worker serves an older manifest than the pod committed."""
        synced = getattr(self.uploads, "synced", True)
        if not synced:
            return f"store {self.uploads.url} not reached yet: waiting for it"
        return self.divergence

    async def learn_routes(self, name: str, *, deadline: float) -> bool:
        """Learn the routes tenant `name` is `routes_pending` for, for a request that found
        no route (one learning reload for all such requests), by `deadline` (trio time);
        False if it is still running then (it goes on: the state is updated when done)."""
        with trio.move_on_at(deadline):
            async with self._learning:
                tenant = self.state.tenants.get(name)
                if tenant is not None and tenant.routes_pending:
                    try:
                        await trio.to_thread.run_sync(self.reload, abandon_on_cancel=True)
                    except Exception:
                        log.exception("reload learning the routes of %s failed", name)
            return True
        return False

    def read_policies(self) -> int:
        """The start, up to readiness: read and check every policy (each error logged and
        counted, as a reload does), and know which tenants `fill` builds and their hosts.
        Returns how many tenants will be served. Blocking."""
        with self._lock:
            policy_set = self._load_policies(force=False)
            errors = {name: error.message for name, error in policy_set.errors.items()}
            for message in errors.values():
                self.reload_errors += 1
                log.error("configuration error, last good state kept: %s", message)
            # Host conflicts are reported by the build, which decides them the same way.
            exact, wildcard = self._host_maps(policy_set.policies, {})
            frozen_errors = MappingProxyType(errors)
            self._filling = _Filling(frozenset(policy_set.policies), exact, wildcard, frozen_errors)
            self.state = dataclasses.replace(EMPTY_STATE, errors=frozen_errors)
            return len(policy_set.policies)

    async def fill(self) -> RegistryState:
        """The rest of the start, while the pod serves: build every tenant (no module is
        loaded), those that requests wait for first (`filling_state`)."""
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            return await trio.to_thread.run_sync(functools.partial(self.reload, learn_routes=False))
        finally:
            filling, self._filling = self._filling, None
            if filling is not None:
                for event in filling.waiters.values():
                    event.set()
                filling.done.set()

    async def filled(self) -> None:
        """Return once every tenant has been built once (at once after the start)."""
        if self._filling is not None:
            await self._filling.done.wait()

    async def filling_state(self, host: str | None, name: str) -> RegistryState | None:
        """While `fill` runs: wait until the tenant a request names is built (the tenant of
        its `host`, else `name`, the one its path names), and return a state holding the
        tenants built so far. None once `fill` is done, or if no such tenant has a policy:
        the request's tenant is unknown."""
        filling = self._filling
        if filling is None:
            return None
        by_host = filling.state.name_for_host(host) if host else None
        name = by_host or name
        if name not in filling.names:
            return None
        if name not in filling.built and name not in filling.failed:
            event = filling.waiters.setdefault(name, trio.Event())
            filling.wanted.append(name)
            await event.wait()
        return filling.state

    def _build_order(self, names: list[str], tenants: Mapping[str, Tenant]) -> Iterator[str]:
        """The order of a reload's `names`, paced (`_paced`). During `fill`, the tenants that
        requests wait for come first, and each tenant, once built (in `tenants`) or failed,
        is handed to them."""
        filling = self._filling
        if filling is None:
            yield from _paced(names)
            return
        token = self._trio_token
        for name in _paced(filling.order(names)):
            yield name
            tenant = tenants.get(name)
            if tenant is None:
                filling.failed.add(name)
            else:
                filling.built[name] = tenant
            if token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(filling.wake, name)

    async def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Check for changed files every `interval_s`, and at once when the store's watch
        says a manifest changed (cancel to stop)."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self.uploads.on_change(self.store_changed)
        while True:
            with trio.move_on_after(interval_s):
                await self._store_event.wait()
            self._store_event = trio.Event()
            try:
                await trio.to_thread.run_sync(self.reload)
            except Exception:
                log.exception("tenant reload failed")

    def _reload(self, force: bool, on_request_path: bool, learn_routes: bool) -> RegistryState:
        old = self.state
        self._resolved_dirs = {}  # each reload resolves again: a folder may become a link
        if self.changes is not None:  # before any file is read: a later change moves it again
            self._changes_seen = self.changes.value()
        policy_set = self._load_policies(force)
        errors: dict[str, str] = {name: error.message for name, error in policy_set.errors.items()}
        defaults_broken = policies.DEFAULTS_FILE in policy_set.errors
        tenants: dict[str, Tenant] = {}
        watched: dict[str, WatchedFiles] = {}
        stale: list[str] = []  # tenants kept in their last good state after a failed build
        rebuilt = False
        names = set(policy_set.policies) | {
            name for name in old.tenants if f"{name}.toml" in policy_set.errors
        }
        for name in self._build_order(sorted(names), tenants):
            policy = policy_set.policies.get(name)
            previous = old.tenants.get(name)  # each tenant of `old` has its `_watched` entry
            if policy is None or (defaults_broken and previous is not None):
                # A broken policy file (or broken defaults) keeps the last good tenant.
                if previous is not None:
                    tenants[name] = previous
                    watched[name] = self._watched[name]
                continue
            # A tenant is built from its policy (compared as a value; the same object while
            # the policy folder is unchanged) and its own files, nothing else.
            if (
                not force
                and previous is not None
                and (previous.policy is policy or previous.policy == policy)
                and self._watched[name].unchanged()
                and not (learn_routes and previous.routes_pending)
            ):
                tenants[name] = previous
                watched[name] = self._watched[name]
                continue
            # Stat the tenant's files before reading them: a file replaced while it is read
            # (another pod's upload) then differs from these keys next time.
            tenant_dir = self.tenants_dir / name
            manifest_file = self.uploads.manifest_dir(name) / store.MANIFEST_FILE
            files = (str(tenant_dir / MODULES_FILE), str(manifest_file))
            before = _stat_keys(files)
            retry = self._retries.get(name)
            if not force and previous is not None and _waiting(retry, before):
                tenants[name] = previous
                watched[name] = self._watched[name]
                stale.append(name)
                continue
            try:
                tenant = self._load_tenant(
                    name, policy, on_request_path=on_request_path, learn_routes=learn_routes
                )
                modules = self._module_files.pop(name, ())
                if on_request_path and tenant.routes_pending and previous is not None:
                    raise _Deferred(f"the routes of tenant {name} are not known yet")
                tenants[name] = tenant
                watched[name] = WatchedFiles(files + modules, before + _stat_keys(modules))
                self._retries.pop(name, None)
                rebuilt = True
            except _Deferred as exc:
                log.info("tenant %s: %s; left to the background reload", name, exc)
                if previous is not None:  # its old files' keys: the next poll rebuilds it
                    tenants[name] = previous
                    watched[name] = self._watched[name]
            except SupervisorError as exc:
                errors[name] = exc.message
                self._retries[name] = _next_retry(retry, before)
                if previous is not None and not previous.routes_pending:  # a good state
                    tenants[name] = previous
                    watched[name] = self._watched[name]
                    stale.append(name)
        for name, message in errors.items():
            if old.errors.get(name) != message:
                self.reload_errors += 1
                log.error("configuration error, last good state kept: %s", message)
        if rebuilt:
            self._forget_unused(tenants)
        exact, wildcard = self._host_maps(
            {name: tenant.policy for name, tenant in tenants.items()}, errors
        )
        self._watched = watched
        self.divergence = _divergence(stale, watched)
        self.state = RegistryState(
            MappingProxyType(tenants),
            MappingProxyType(exact),
            tuple(wildcard),
            MappingProxyType(errors),
        )
        return self.state

    def _forget_unused(self, tenants: Mapping[str, Tenant]) -> None:
        """Drop cached modules no tenant serves any more.

        Every upload adds a version, and a compiled module keeps its machine code mapped: the
        caches must not outlive what is served. (`list(...)` snapshots the keys: an upload's
        dry run may add entries from another thread meanwhile.)
        """
        live = {
            route.target.sha256 for tenant in tenants.values() for route in tenant.routes.routes
        }
        self.loaded.keep_only(live)
        for sha in list(self._routes_output):
            if sha not in live:
                self._routes_output.pop(sha, None)
        for memo in (self._inspected, self._by_content):
            for key, inspected in list(memo.items()):
                if inspected.sha256 not in live:
                    memo.pop(key, None)

    def _load_policies(self, force: bool) -> policies.PolicySet:
        """The policy folder, parsed again only when a file in it changed.

        A poll of 1,000 unchanged tenants spent most of its ~100 ms (every second, holding
        the GIL) re-parsing policy files; listing and stat-ing the folder costs a few ms.
        A set with errors is parsed again with backoff even when nothing changed: a read that
        failed for a moment (no free descriptor) must not be kept until the folder changes.
        """
        key = _folder_key(str(self.policies_dir))
        retry_due = (
            self._policy_set is not None
            and bool(self._policy_set.errors)
            and time.monotonic() >= self._policy_retry.at
        )
        if force or self._policy_set is None or key != self._policy_key or retry_due:
            self._policy_set = policies.load_policy_dir(self.policies_dir)
            if self._policy_set.errors:
                self._policy_retry = _next_retry(self._policy_retry, key)
            self._policy_key = key
        return self._policy_set

    def _load_tenant(
        self,
        name: str,
        policy: Policy,
        manifest: store.Manifest | None = None,
        *,
        on_request_path: bool = False,
        learn_routes: bool = False,
    ) -> Tenant:
        """Build tenant `name` without loading its modules (each route loads its module on
        its first request). `on_request_path` raises _Deferred rather than read a module file
        or pull one; `learn_routes` loads a modules.toml module whose `_routes` were never
        run and runs them (else the tenant is built `routes_pending`)."""
        tenant_dir = self.tenants_dir / name
        modules_file = tenant_dir / MODULES_FILE
        specs = (
            parse_modules_toml(
                policies.read_toml(modules_file),
                source=str(modules_file),
                operator_paths=self.operator_root is not None,
            )
            if modules_file.exists()
            else []
        )
        guest_limits = _guest_limits(policy)
        policy_volumes = _resolve_volumes(tenant_dir, policy.volumes, source=f"{name} policy")
        # (owner, source, spec): modules.toml entries, then the named modules by name.
        entries: list[tuple[str | None, str, ModuleSpec]] = [
            (None, f"{modules_file}: module[{index}]", spec) for index, spec in enumerate(specs)
        ]
        manifest_dir = self.uploads.manifest_dir(name)
        if manifest is None:
            manifest = store.read_manifest(manifest_dir)
        manifest_file = manifest_dir / store.MANIFEST_FILE
        entries += [
            (module_name, f"{manifest_file}: modules.{module_name}", _manifest_spec(record))
            for module_name, record in sorted(manifest.modules.items())
        ]
        outbound_policy = parse_allow_list(policy.outbound_hosts)
        refs: dict[str, tuple[ModuleRef, frozenset[str] | None]] = {}
        files: dict[str, str] = {}  # spec.module -> its local file when built (watched)
        routes: list[Route[RouteTarget]] = []
        owners: dict[str, tuple[str | None, str]] = {}  # pattern -> (owner, source)
        routes_pending = False
        for owner, source, spec in entries:
            if spec.module not in refs:
                refs[spec.module], path = self._module_ref(
                    name,
                    tenant_dir,
                    spec.module,
                    owner,
                    policy,
                    source=source,
                    on_request_path=on_request_path,
                )
                if path is not None:
                    files[spec.module] = str(path)
            ref, exports = refs[spec.module]
            if owner is not None and spec.module != f"{store.MODULES_DIR}/{ref.sha256}.wasm":
                raise ConfigError(source, "sha256", f"{spec.module} does not hold that content")
            _check_entrypoint(exports, spec.entrypoint, source=source)
            volumes = policy_volumes + _resolve_volumes(
                self.operator_root or tenant_dir,
                spec.volumes,
                source=source,
                confined=self.operator_root is None,
            )
            grant = None
            if spec.allowed_hosts is not None:
                grant = outbound_abi.Grant(
                    self.outbound.get(name, outbound_policy, policy.max_outbound_concurrency),
                    parse_allow_list(spec.allowed_hosts),
                    spec.http_max_concurrency,
                    policy.max_outbound_requests,
                    policy.max_outbound_response_bytes,
                )
            target = RouteTarget(
                spec.module, ref.sha256, ref, spec.entrypoint, spec.argv, volumes, owner, grant
            )
            own_routes = [Route(spec.route, target)]
            declared = spec.declared_routes
            if declared is None:
                declared = self._routes_of(
                    ref, exports, policy, spec.module, source, learn=learn_routes
                )
                routes_pending = routes_pending or declared is None
            try:
                check_route_count(
                    declared or (),
                    max_routes_per_module=policy.max_routes_per_module,
                    name=spec.module,
                )
            except RoutesRefused as exc:
                raise ConfigError(source, exc.key, exc.message) from exc
            for pattern, export in declared or ():
                _check_entrypoint(exports, export, source=f"{source} `_routes`")
                sub_target = RouteTarget(
                    spec.module, ref.sha256, ref, export, spec.argv, volumes, owner, grant
                )
                try:
                    own_routes.append(Route(join_route(spec.route, pattern), sub_target))
                except RouteError as exc:
                    raise ConfigError(source, "_routes", str(exc)) from exc
            for route in own_routes:
                _claim(owners, route.pattern, owner, source)
            routes += own_routes
            if len(routes) > policy.max_routes:
                raise ConfigError(
                    source,
                    "max_routes",
                    f"tenant {name!r} would serve more than max_routes ({policy.max_routes})"
                    " routes",
                )
        modules = {module: ref for module, (ref, _) in refs.items()}
        _check_artifact_bytes(self.cache, modules.values(), policy, source=f"tenant {name}")
        self._module_files[name] = tuple(files.values())
        return Tenant(
            name=name,
            policy=policy,
            routes=RouteTable(routes),
            guest_limits=guest_limits,
            admission_limits=TenantLimits(
                policy.max_concurrency, policy.max_queue, policy.queue_timeout_ms
            ),
            modules=MappingProxyType(modules),
            routes_pending=routes_pending,
        )

    def _module_ref(
        self,
        name: str,
        tenant_dir: Path,
        relative: str,
        owner: str | None,
        policy: Policy,
        *,
        source: str,
        on_request_path: bool = False,
    ) -> tuple[tuple[ModuleRef, frozenset[str] | None], Path | None]:
        """How to load a module, its exports when they were read (None: an upload's, checked
        when it was uploaded), and the local file to watch (None: an `oci:` reference, or an
        upload not fetched from a remote store yet). Nothing is compiled, deserialized or
        fetched here: an upload held by a remote store is fetched by its first load."""
        if oci.is_reference(relative):
            if on_request_path:  # a registry round trip: the poll's work
                raise _Deferred(f"{relative} is not pulled yet")
            return self._pulled_ref(relative, policy, source=source), None
        digest = store.digest_of(relative)
        if owner is not None and digest is not None:
            # An upload: in the store under its verified digest, its imports, entrypoint and
            # routes checked at upload. Not read here; located (and fetched, if the store is
            # remote) by its load, in the load's thread.
            local = self.uploads.module_path(name, digest, fetch=False)
            stat_key = _stat_key(str(local))
            size = stat_key[1] if stat_key is not None else 0
            ref = self._upload_ref(name, relative, digest, size, policy)
            return (ref, None), (local if stat_key is not None else None)
        root = self.operator_root or tenant_dir
        path = (root / relative).resolve()
        if self.operator_root is None and not path.is_relative_to(self._resolved_dir(tenant_dir)):
            raise ConfigError(source, "module", "must be a file inside the tenant's folder")
        stat_key = _stat_key(str(path))
        if digest is not None and stat_key is not None:
            # A file named by its digest (as the admin API's uploads are): not even read
            # here; its load verifies that it holds that content.
            return (self._file_ref(path, relative, digest, stat_key[1], policy), None), path
        key = (str(path), stat_key)
        inspected = self._inspected.get(key)
        if inspected is None:
            if on_request_path:  # reading and hashing a module: the poll's work
                raise _Deferred(f"{relative} is not read yet")
            inspected = self._inspect_file(path, relative, policy, source=source)
            self._inspected[key] = inspected
        try:
            _check_info(inspected.info, relative, policy)
        except ModuleRejected as exc:
            raise ConfigError(source, "module", exc.message) from exc
        ref = self._file_ref(path, relative, inspected.sha256, inspected.size, policy)
        return (ref, inspected.exports), path

    def _inspect_file(
        self, path: Path, relative: str, policy: Policy, *, source: str
    ) -> _Inspected:
        """Read, convert, inspect and validate a module file, once per content: 1,000 tenants
        naming copies of one `.wat` convert and validate it once (1.8 s to ~0.1 s at start)."""
        raw = _read_file(path, relative, policy, source=source)
        content = hashlib.sha256(raw).hexdigest()
        inspected = self._by_content.get(content)
        if inspected is not None:
            return inspected
        try:
            binary = to_binary(raw, name=relative)
            info = inspect(binary)
            # Validating costs a fraction of compiling: a broken file is reported (and the
            # last good state kept) now, not on its first request.
            wasmtime.Module.validate(self.sandbox.engine, binary)
        except ModuleRejected as exc:
            raise ConfigError(source, "module", exc.message) from exc
        except wasmtime.WasmtimeError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ConfigError(source, "module", f"{relative} is not valid: {reason}") from exc
        inspected = _Inspected(hashlib.sha256(binary).hexdigest(), len(binary), info)
        self._by_content[content] = inspected
        return inspected

    def _resolved_dir(self, tenant_dir: Path) -> Path:
        """`tenant_dir` resolved once per reload, not once per module (1,000 tenants: ~40 ms)."""
        resolved = self._resolved_dirs.get(tenant_dir)
        if resolved is None:
            resolved = self._resolved_dirs[tenant_dir] = tenant_dir.resolve()
        return resolved

    def _file_ref(
        self, path: Path, relative: str, digest: str, size: int, policy: Policy
    ) -> ModuleRef:
        """A module file of the operator's: its artifact if cached, else the file, checked
        against the digest it had when its tenant was read, and compiled."""
        return self._compiled_ref(
            lambda: path, relative, digest, size, policy, "changed since its tenant was loaded"
        )

    def _upload_ref(
        self, name: str, relative: str, digest: str, size: int, policy: Policy
    ) -> ModuleRef:
        """An upload of tenant `name`: its artifact if cached, else its file from the store
        (`module_path` fetches it from a remote store: this runs in the load's thread, never
        on the event loop), verified against its digest and compiled."""
        return self._compiled_ref(
            lambda: self.uploads.module_path(name, digest),
            relative,
            digest,
            size,
            policy,
            "does not hold the content it is named by",
        )

    def _compiled_ref(
        self,
        module_file: Callable[[], Path],
        relative: str,
        digest: str,
        size: int,
        policy: Policy,
        mismatch: str,
    ) -> ModuleRef:
        """A module loaded (in the load's thread) from its cached or shared artifact by
        `digest` alone, else read from `module_file()`, refused with `mismatch` when its bytes
        are not `digest`'s, and compiled."""

        def load() -> Loaded:
            started = time.perf_counter()
            compiled = self.cache.load_cached(digest, size=size)
            if compiled is None:
                binary = _read_module(module_file(), relative, policy, source=relative)
                if hashlib.sha256(binary).hexdigest() != digest:
                    raise ModuleRejected(f"{relative} {mismatch}")
                compiled = self.cache.load(
                    binary, name=relative, limits=CompileLimits.of(policy), not_cached=True
                )
            return self._loaded(compiled, started, source=relative)

        return ModuleRef(digest, relative, load)

    def _pulled_ref(
        self, reference: str, policy: Policy, *, source: str
    ) -> tuple[ModuleRef, frozenset[str]]:
        """An `oci:` module, pulled on every load of its tenant (a tag is pinned to the
        digest it resolves to now, until the next reload) and verified; compiled (or its
        artifact loaded) on its first request."""
        try:
            pulled = self.pulled_modules.fetch(reference, max_bytes=policy.max_module_bytes)
            info = check_module_binary(
                pulled.content, name=reference, memory_limit=policy.memory_bytes
            )
            check_compile_bounds(pulled.content, CompileLimits.of(policy), name=reference)
        except oci.PullError as exc:
            raise ConfigError(source, "module", str(exc)) from exc
        except ModuleRejected as exc:
            raise ConfigError(source, "module", exc.message) from exc
        digest = hashlib.sha256(pulled.content).hexdigest()
        size = len(pulled.content)
        pulled = dataclasses.replace(pulled, content=b"")  # what it resolved to, not its bytes

        def load() -> Loaded:
            started = time.perf_counter()
            compiled = self.cache.load_cached(digest, size=size)
            if compiled is None:
                content = self.pulled_modules.stored(
                    pulled, max_bytes=policy.max_module_bytes
                ) or self.pulled_modules.fetch(reference, max_bytes=policy.max_module_bytes)
                if hashlib.sha256(content.content).hexdigest() != digest:
                    raise ModuleRejected(f"{reference} changed since its tenant was loaded")
                compiled = self.cache.load(
                    content.content,
                    name=reference,
                    limits=CompileLimits.of(policy),
                    not_cached=True,
                )
            return self._loaded(compiled, started, source=reference)

        exports = frozenset(export.name for export in info.exports)
        return ModuleRef(digest, reference, load), exports

    def _loaded(self, compiled: CompiledModule, started: float, *, source: str) -> Loaded:
        """A compiled module linked, with what it costs to hold (its artifact's bytes)."""
        prepared = self._prepare(compiled, source=source)
        size = max(self.cache.artifact_bytes(compiled.sha256), compiled.size)
        return Loaded(prepared, size, time.perf_counter() - started, not compiled.cache_hit)

    def _prepare(self, module: CompiledModule, *, source: str) -> PreparedModule:
        try:
            return self.sandbox.prepare(module.module)
        except Exception as exc:
            raise ConfigError(source, "module", f"cannot be linked: {exc}") from exc

    def _routes_of(
        self,
        ref: ModuleRef,
        exports: frozenset[str] | None,
        policy: Policy,
        name: str,
        source: str,
        *,
        learn: bool,
    ) -> store.DeclaredRoutes | None:
        """The routes a module not uploaded through the admin API declares: none if it has no
        `_routes`, else from memory, else the routes cache, else (when `learn`; None if not)
        its `_routes` run once for the whole pod and stored."""
        if exports is not None and ROUTES_EXPORT not in exports:
            return ()
        declared = self._routes_output.get(ref.sha256) or self.routes_cache.peek(ref.sha256)
        if declared is None and not learn:
            return None
        try:
            if declared is None:
                loaded = ref.load()  # a thread of its own: this reload's, not a request's
                declared = self._learn_routes_of(ref.sha256, loaded.prepared, policy, name)
            self._routes_output[ref.sha256] = declared
            return _within_output_limit(declared, policy, name).routes
        except RoutesRefused as exc:
            raise ConfigError(source, exc.key, exc.message) from exc
        except ModuleRejected as exc:
            raise ConfigError(source, "module", exc.message) from exc

    def _learn_routes(
        self, module: CompiledModule, prepared: PreparedModule, policy: Policy, name: str
    ) -> Declared:
        """From memory, else the pod's routes cache, else `_routes` run once and stored.

        Raises RoutesRefused naming the limit.
        """
        declared = self._learn_routes_of(module.sha256, prepared, policy, name)
        return _within_output_limit(declared, policy, name)

    def _learn_routes_of(
        self, sha256: str, prepared: PreparedModule, policy: Policy, name: str
    ) -> Declared:
        declared = self._routes_output.get(sha256)
        if declared is None:
            declared = self.routes_cache.get(
                sha256,
                lambda: run_routes_export(
                    self.sandbox,
                    prepared,
                    _guest_limits(policy),
                    max_output_bytes=policy.max_routes_output_bytes,
                    name=name,
                ),
            )
            self._routes_output[sha256] = declared
        return declared

    @staticmethod
    def _host_maps(
        tenant_policies: Mapping[str, Policy], errors: dict[str, str]
    ) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Host -> tenant; a host claimed twice goes to the first tenant by name, reported."""
        exact: dict[str, str] = {}
        wildcard: dict[str, str] = {}
        for name in sorted(tenant_policies):
            for host in tenant_policies[name].hosts:
                table, key = (wildcard, host[1:]) if host.startswith("*.") else (exact, host)
                owner = table.setdefault(key, name)
                if owner != name:
                    errors[f"{name}.hosts"] = (
                        f"{name}: hosts: {host!r} is already served by tenant {owner!r}"
                    )
        ordered = sorted(wildcard.items(), key=lambda item: -len(item[0]))
        return exact, ordered


def check_module_binary(binary: bytes, *, name: str, memory_limit: int) -> WasmInfo:
    """Refuse, before compiling, a module that could never run here (raises ModuleRejected);
    what it imports and exports otherwise."""
    info = inspect(binary)
    _check_imports_and_memory(info, name, memory_limit)
    return info


def _check_info(info: WasmInfo, name: str, policy: Policy) -> None:
    """What `check_module_binary` and the compile bounds check, for a module inspected once
    for every tenant naming it (each with its own policy). Raises ModuleRejected."""
    _check_imports_and_memory(info, name, policy.memory_bytes)
    check_compile_bounds_of(info, CompileLimits.of(policy), name=name)


def _check_imports_and_memory(info: WasmInfo, name: str, memory_limit: int) -> None:
    refused = [
        imp
        for imp in disallowed_imports(info)
        if imp.kind != "func" or (imp.module, imp.name) not in _OFFERED_IMPORTS
    ]
    if refused:
        first = refused[0]
        hint = (
            f"{outbound_abi.MODULE} offers {', '.join(sorted(outbound_abi.IMPORTS))}"
            if first.module == outbound_abi.MODULE
            else f"only wasi_snapshot_preview1 and {outbound_abi.MODULE} are offered"
        )
        raise ModuleRejected(f"{name}: imports {first.module}.{first.name} ({first.kind}); {hint}")
    if info.initial_memory_bytes is not None and info.initial_memory_bytes > memory_limit:
        raise ModuleRejected(
            f"{name}: initial memory of {info.initial_memory_bytes} bytes exceeds the tenant's "
            f"memory_bytes ({memory_limit})"
        )


def _within_output_limit(declared: Declared, policy: Policy, name: str) -> Declared:
    """`declared`, unless `_routes` printed more than the policy allows (learned under another
    tenant's larger limit): raises RoutesRefused naming the limit."""
    limit = policy.max_routes_output_bytes
    if declared.output_bytes > limit:
        raise RoutesRefused(
            f"{name}: `_routes` printed {declared.output_bytes} bytes, over"
            f" max_routes_output_bytes ({limit})",
            key="max_routes_output_bytes",
        )
    return declared


def _read_file(path: Path, relative: str, policy: Policy, *, source: str) -> bytes:
    """A module file's bytes, within the policy's `max_module_bytes`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, "module", f"cannot read {relative}: {exc.strerror}") from exc
    if len(raw) > policy.max_module_bytes:
        raise ConfigError(
            source, "module", f"{relative} is larger than max_module_bytes ({len(raw)} bytes)"
        )
    return raw


def _read_module(path: Path, relative: str, policy: Policy, *, source: str) -> bytes:
    """A module file's binary (`.wat` converted), within the policy's `max_module_bytes`."""
    try:
        return to_binary(_read_file(path, relative, policy, source=source), name=relative)
    except ModuleRejected as exc:
        raise ConfigError(source, "module", exc.message) from exc


def _check_artifact_bytes(
    cache: ArtifactCache, modules: Iterable[ModuleRef], policy: Policy, *, source: str
) -> None:
    """Refuse a tenant whose modules' compiled artifacts exceed its `max_artifact_bytes`.

    Artifacts in use cannot be evicted from the cache (modules.py), so this bound is what keeps
    one tenant from filling it; a module shared by tenants counts for each of them.
    """
    total = sum(cache.artifact_bytes(sha256) for sha256 in {module.sha256 for module in modules})
    if total > policy.max_artifact_bytes:
        raise ConfigError(
            source,
            "max_artifact_bytes",
            f"its modules' compiled artifacts would take {total} bytes of the artifact cache,"
            f" over max_artifact_bytes ({policy.max_artifact_bytes})",
        )


def _manifest_spec(record: store.ModuleRecord) -> ModuleSpec:
    version = record.current
    return ModuleSpec(
        version.route,
        version.module_file,
        version.entrypoint,
        version.argv,
        version.volumes,
        declared_routes=version.declared_routes,
        allowed_hosts=version.allowed_hosts,
        http_max_concurrency=version.http_max_concurrency,
    )


def _guest_limits(policy: Policy) -> GuestLimits:
    return GuestLimits(
        fuel=policy.fuel_per_request,
        memory_bytes=policy.memory_bytes,
        timeout_ms=policy.timeout_ms,
        max_stdout_bytes=policy.max_response_bytes,
        max_stderr_bytes=policy.max_stderr_bytes,
        max_poll_subscriptions=policy.max_poll_subscriptions,
    )


def _waiting(retry: _Retry | None, files: tuple) -> bool:
    """Whether a tenant that failed to rebuild from these same files must wait to retry."""
    return retry is not None and retry.files == files and time.monotonic() < retry.at


def _next_retry(retry: _Retry | None, files: tuple) -> _Retry:
    """The retry after one more failure: the delay doubles while the files stay the same."""
    delay = RETRY_FIRST_S
    if retry is not None and retry.files == files:
        delay = min(retry.delay_s * 2, RETRY_MAX_S)
    return _Retry(files, time.monotonic() + delay, delay)


def _divergence(stale: list[str], watched: Mapping[str, WatchedFiles]) -> str | None:
    """One line naming the tenants served from an older manifest than the one on disk.

    The manifest is only ever written by a commit that built it (the admin API's dry run), so
    a worker that fails to build it has split from the workers and pods that do. A tenant kept
    for a broken policy file is left out: every worker reads the same file, so they agree,
    and the operator's error is reported as such (one tenant's policy must not make the pod
    unready).
    """
    behind = [
        name
        for name in stale
        if _stat_key(watched[name].paths[1]) != watched[name].keys[1]  # manifest.json
    ]
    if not behind:
        return None
    return (
        f"this worker cannot load the manifest the pod committed for tenant {behind[0]!r}"
        + (f" and {len(behind) - 1} more" if len(behind) > 1 else "")
        + "; see the server log"
    )


def _claim(
    owners: dict[str, tuple[str | None, str]], pattern: str, owner: str | None, source: str
) -> None:
    """Record that `owner` serves `pattern`; two owners of one pattern are a RouteConflict.

    Within modules.toml an equal pattern may repeat (the later entry wins, WAGI.md); across
    modules.toml and the named modules, or between two named modules, it may not.
    """
    claimed = owners.setdefault(pattern, (owner, source))
    if claimed[0] != owner:
        first, second = (
            "modules.toml" if name is None else f"module {name!r}" for name in (claimed[0], owner)
        )
        raise RouteConflict(source, "route", f"{pattern!r} is claimed by both {first} and {second}")


def _check_entrypoint(exports: frozenset[str] | None, entrypoint: str, *, source: str) -> None:
    """`exports` None: an upload's, whose entrypoints were checked when it was uploaded."""
    if exports is not None and entrypoint not in exports:
        raise ConfigError(source, "entrypoint", f"the module exports no {entrypoint!r}")


def _resolve_volumes(
    tenant_dir: Path, volumes: Mapping[str, str], *, source: str, confined: bool = True
) -> tuple[Volume, ...]:
    """Each volume's folder under `tenant_dir`; not `confined` (`wagi` mode), any folder,
    absolute or relative to it."""
    if not volumes:  # most modules: no `resolve` (a few stat calls) per module at start
        return ()
    resolved = []
    root = tenant_dir.resolve()
    for guest_path, folder in volumes.items():
        host = (tenant_dir / folder).resolve()
        if not confined and not host.is_dir():
            raise ConfigError(source, f"volumes.{guest_path}", f"{str(host)!r} is not a folder")
        if confined and (not host.is_relative_to(root) or not host.is_dir()):
            raise ConfigError(
                source, f"volumes.{guest_path}", f"{folder!r} is not a folder inside {tenant_dir}"
            )
        resolved.append(Volume(str(host).encode(), guest_path.encode()))
    return tuple(resolved)


def _folder_key(folder: str) -> tuple:
    """The names and `stat` of a folder's entries (following links: ConfigMap mounts are links).

    The names are part of the key: a rename keeps a file's stat.
    """
    try:
        names = tuple(sorted(os.listdir(folder)))
    except OSError:
        return ()
    return names, _stat_keys(_paced([os.path.join(folder, name) for name in names]))


def _paced(items: Iterable[T]) -> Iterator[T]:
    """`items`, offering the CPU (and the GIL) to other threads every YIELD_EVERY_S.

    A thread that makes many short syscalls (a poll's stat calls) drops and retakes the GIL
    around each one, so a waiting thread (the event loop, woken by a request) rarely gets it
    in between, nor does it ask for it after the switch interval, since it saw the GIL change
    hands; on one core it can wait for the whole poll. `os.sched_yield` releases the GIL and
    lets a woken thread run.
    """
    due = time.perf_counter() + YIELD_EVERY_S
    for item in items:
        if time.perf_counter() >= due:
            os.sched_yield()
            due = time.perf_counter() + YIELD_EVERY_S
        yield item


def _stat_keys(paths: Iterable[str]) -> tuple[StatKey | None, ...]:
    return tuple(map(_stat_key, paths))


def _stat_key(path: str) -> StatKey | None:
    """None for a file that can't be stat-ed (missing, or not readable)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
